"""Splits: stratified held-out cells, held-out doubles, and the leakage guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturbscope.pipelines.perturbation_prediction.splits import (
    NOT_APPLICABLE,
    LeakageError,
    SplitError,
    assert_no_leakage,
    auto_held_out_perturbations,
    is_applicable,
    make_split,
    reference_mask,
    training_mask,
)


def _obs(counts: dict[str, int], validation_every: int = 10) -> pd.DataFrame:
    labels = [label for label, n in counts.items() for _ in range(n)]
    genes = ["" if lab == "control" else "+".join(sorted(lab.split("+"))) for lab in labels]
    split = np.where(np.arange(len(labels)) % validation_every == 0, "validation", "train")
    return pd.DataFrame(
        {
            "perturbation": labels,
            "perturbed_genes": genes,
            "is_control": [lab == "control" for lab in labels],
            "split": split,
        },
        index=[f"c{i}" for i in range(len(labels))],
    )


OBS = _obs({"control": 50, "A": 40, "B": 40, "C": 30, "A+B": 30, "B+A+C": 20, "A+D": 20, "E": 1})


def test_auto_holds_out_the_doubles_whose_singles_are_all_in_the_screen() -> None:
    # A+D: D has no single perturbation; B+A+C counts (all three singles exist)
    assert auto_held_out_perturbations(OBS) == ["A+B", "B+A+C"]


def test_held_out_perturbations_split() -> None:
    split = make_split(OBS, kind="held_out_perturbations", perturbations="auto")
    held = split["perturbation"].isin(["A+B", "B+A+C"])
    assert (split.loc[held, "role"] == "test").all()
    assert (split.loc[~held, "role"] != "test").all()
    assert (split.loc[held, "evaluation"] == "held_out_perturbations").all()
    # half of the controls are reference controls; every other cell keeps the processed split
    reference = split["role"] == "reference"
    assert reference.sum() == 25 and split.loc[reference, "is_control"].all()
    assert not training_mask(split)[reference.to_numpy()].any()
    rest = ~held & ~reference
    assert (split.loc[rest, "role"].astype(str) == OBS.loc[rest, "split"]).all()
    # labels can be given in any gene order
    explicit = make_split(OBS, kind="held_out_perturbations", perturbations=["B+A"])
    assert set(explicit.loc[explicit["role"] == "test", "perturbation"]) == {"A+B"}


def test_held_out_perturbation_errors() -> None:
    with pytest.raises(SplitError, match="not in the screen"):
        make_split(OBS, kind="held_out_perturbations", perturbations=["A+Z"])
    # D is perturbed only by A+D: holding it out leaves no training cell perturbing D
    with pytest.raises(SplitError, match=r"perturbs \['D'\]"):
        make_split(OBS, kind="held_out_perturbations", perturbations=["A+D"])
    with pytest.raises(SplitError, match="kind"):
        make_split(OBS, kind="random")
    with pytest.raises(SplitError, match="data_processing"):
        make_split(OBS.drop(columns="split"), kind="held_out_cells")


def test_held_out_cells_are_a_stratified_share() -> None:
    split = make_split(OBS, seed=0, kind="held_out_cells", test_fraction=0.2)
    test = split["role"] == "test"
    per = split.groupby("perturbation")["role"].agg(lambda r: int((r == "test").sum()))
    assert per.to_dict() == {"A": 8, "A+B": 6, "A+D": 4, "B": 8, "B+A+C": 4, "C": 6, "E": 0, "control": 0}
    # test cells come from the processed train split; every perturbation keeps training cells
    assert (OBS.loc[test, "split"] == "train").all()
    assert split[training_mask(split)].groupby("perturbation").size().min() >= 1
    # no reference controls: the deltas' reference is the training controls
    plain = make_split(OBS, kind="held_out_cells", reference_control_fraction=0.0)
    assert "reference" not in set(plain["role"])
    np.testing.assert_array_equal(reference_mask(plain), plain["is_control"].to_numpy())
    # seeded
    again = make_split(OBS, seed=0, kind="held_out_cells", test_fraction=0.2)
    pd.testing.assert_frame_equal(split, again)
    other = make_split(OBS, seed=1, kind="held_out_cells", test_fraction=0.2)
    assert not split["role"].equals(other["role"])
    with pytest.raises(SplitError, match="test_fraction"):
        make_split(OBS, kind="held_out_cells", test_fraction=1.0)


def test_leakage_guard() -> None:
    split = make_split(OBS, kind="held_out_perturbations")
    train_names = split.index[training_mask(split)]
    assert_no_leakage(split, train_names)  # the split's own training cells are fine
    test_name = split.index[split["role"] == "test"][0]
    with pytest.raises(LeakageError, match="test cell"):
        assert_no_leakage(split, list(train_names) + [test_name])
    tampered = split.copy()
    tampered.loc[test_name, ["role", "evaluation"]] = ["train", ""]
    with pytest.raises(LeakageError, match="not test cells"):
        assert_no_leakage(tampered)
    tampered = split.copy()
    tampered.loc[split.index[split["is_control"]][0], "role"] = "test"
    with pytest.raises(LeakageError, match="control"):
        assert_no_leakage(tampered)
    reference_cell = split.index[split["role"] == "reference"][0]
    with pytest.raises(LeakageError, match="reference control"):
        assert_no_leakage(split, list(train_names) + [reference_cell])


def test_held_out_perturbations_on_a_singles_only_screen_is_not_applicable() -> None:
    """A knockout screen without doubles has nothing to hold out: no test cells, no error."""
    split = make_split(_obs({"control": 5, "A": 5, "B": 5}), kind="held_out_perturbations")
    assert not is_applicable(split)
    assert set(split["role"].astype(str)) <= {"train", "validation", "reference"}
    assert "singles-only" in NOT_APPLICABLE["held_out_perturbations"]
    assert is_applicable(make_split(OBS, kind="held_out_perturbations"))
