"""The MLflow model registry helpers: comparison rules, register, load back by name/version/alias."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from perturbscope.models import ContrastiveVAE, seeded
from perturbscope.ops.registry import (
    MetricRule,
    RegistryConfigError,
    champion_version,
    compare_metrics,
    load_registered_model,
    metric_rules,
    model_uri,
    register_model_version,
    registered_data_hashes,
    version_metrics,
)

ARI = MetricRule("ari", "m.ari", higher_is_better=True, margin=0.05)
LOSS = MetricRule("loss", "m.loss", higher_is_better=False, margin=1.0)


def verdicts(table) -> dict[str, str]:
    return dict(zip(table["metric"], table["verdict"]))


def test_first_version_is_promoted() -> None:
    table, promote, reason = compare_metrics({"m.ari": 0.5}, None, [ARI, LOSS])
    assert promote and "first version" in reason
    assert set(table["verdict"]) == {"no champion"}


@pytest.mark.parametrize(
    ("candidate", "expected", "promote"),
    [
        ({"m.ari": 0.60, "m.loss": 9.0}, {"ari": "better", "loss": "better"}, True),
        ({"m.ari": 0.50, "m.loss": 10.0}, {"ari": "equal", "loss": "equal"}, True),
        ({"m.ari": 0.46, "m.loss": 10.9}, {"ari": "within margin", "loss": "within margin"}, True),
        ({"m.ari": 0.44, "m.loss": 10.0}, {"ari": "worse", "loss": "equal"}, False),  # 0.06 > 0.05
        ({"m.ari": 0.50, "m.loss": 11.5}, {"ari": "equal", "loss": "worse"}, False),  # lower is better
    ],
)
def test_promotion_follows_direction_and_margins(candidate, expected, promote) -> None:
    table, promoted, reason = compare_metrics(candidate, {"m.ari": 0.5, "m.loss": 10.0}, [ARI, LOSS])
    assert verdicts(table) == expected
    assert promoted is promote
    if not promote:
        assert "worse by" in reason and "margin" in reason
    row = table.set_index("metric").loc["ari"]
    assert row["change"] == pytest.approx(candidate["m.ari"] - 0.5)
    assert row["worse_by"] == pytest.approx(0.5 - candidate["m.ari"])


def test_negative_margin_requires_an_improvement() -> None:
    rule = MetricRule("ari", "m.ari", margin=-0.1)
    table, promote, reason = compare_metrics({"m.ari": 0.55}, {"m.ari": 0.5}, [rule])
    assert not promote and verdicts(table) == {"ari": "not better enough"} and "requires" in reason
    assert compare_metrics({"m.ari": 0.65}, {"m.ari": 0.5}, [rule])[1]


def test_missing_metrics() -> None:
    champion = {"m.ari": 0.5}
    table, promote, reason = compare_metrics({}, champion, [ARI])
    assert verdicts(table) == {"ari": "missing"} and not promote and "not measured" in reason
    assert compare_metrics({}, champion, [ARI], block_on_missing=False)[1]
    # a metric the champion never had, or nobody has, does not block
    table, promote, _ = compare_metrics({"m.ari": 0.1, "m.nan": float("nan")}, {}, [ARI, MetricRule("x", "m.nan")])
    assert verdicts(table) == {"ari": "no reference", "x": "not measured"} and promote


def test_metric_rules_validate_the_parameters() -> None:
    rules = metric_rules("contrastive", {"ari": {"metric": "m.ari", "higher_is_better": False, "margin": "0.1"}})
    assert rules == [MetricRule("ari", "m.ari", higher_is_better=False, margin=0.1)]
    with pytest.raises(RegistryConfigError, match="retrain.models.contrastive.metrics.ari needs `metric`"):
        metric_rules("contrastive", {"ari": {"margin": 0.1}})
    with pytest.raises(RegistryConfigError, match="margin must be a number"):
        metric_rules("contrastive", {"ari": {"metric": "m", "margin": "big"}})
    with pytest.raises(RegistryConfigError, match="takes `higher_is_better` and `margin`"):
        metric_rules("contrastive", {"ari": {"metric": "m", "lower": True}})


def test_model_uri() -> None:
    assert model_uri("m", 3) == "models:/m/3"
    assert model_uri("m", "champion") == "models:/m@champion"


def test_register_and_load_back_by_version_and_alias(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "mlruns"))
    with seeded(0):
        model = ContrastiveVAE(n_genes=7, n_background=2, n_salient=3, n_hidden=8)
    model.metadata = {"genes": [f"g{i}" for i in range(7)]}
    versions = []
    for sha, ari in (("aaa", 0.3), ("bbb", 0.4)):
        run = client.create_run(experiment)
        versions.append(
            register_model_version(
                client,
                "perturbscope-contrastive-s",
                run.info.run_id,
                model,
                artifact_path="registry/contrastive",
                tags={"data_sha256": sha, "parameters": {"n_salient": 3}, "none": None},
                metrics={"m.ari": ari},
                model_tags={"screen": "s"},
            )
        )
        client.set_terminated(run.info.run_id)
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert registered_data_hashes(client, "perturbscope-contrastive-s") == {"aaa", "bbb"}
    assert registered_data_hashes(client, "nothing") == set()
    assert champion_version(client, "perturbscope-contrastive-s") is None
    client.set_registered_model_alias("perturbscope-contrastive-s", "champion", "1")
    champion = champion_version(client, "perturbscope-contrastive-s")
    assert str(champion.version) == "1" and version_metrics(champion) == {"m.ari": 0.3}
    assert champion.tags["parameters"] == '{"n_salient": 3}' and "none" not in champion.tags

    for ref in ("champion", 1, "2"):
        loaded = load_registered_model("perturbscope-contrastive-s", ref, tracking_uri=uri)
        assert isinstance(loaded, ContrastiveVAE) and not loaded.training
        assert loaded.metadata["genes"] == model.metadata["genes"]
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[key])
    with pytest.raises(ValueError, match=r"versions \[1, 2\], aliases \['champion'\]"):
        load_registered_model("perturbscope-contrastive-s", "staging", tracking_uri=uri)
    with pytest.raises(ValueError, match="No registered model 'nope'"):
        load_registered_model("nope", tracking_uri=uri)
    assert mlflow.active_run() is None
