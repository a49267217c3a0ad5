"""The typed training configuration: TOML, key=value overrides, one-line errors."""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    cfg = TrainConfig()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert TrainConfig.from_toml(path) == cfg


def test_toml_tables_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nhidden = [64, 32]\nactivation = "tanh"\n[optimizer]\nlr = 0.01\nepochs = 3\n')
    cfg = TrainConfig.from_toml(path).with_overrides(["mode=sync", "lr=2e-3", "hidden=[8]", "overlap=false"])
    assert cfg.hidden == [8] and cfg.activation == "tanh" and cfg.epochs == 3
    assert cfg.lr == pytest.approx(2e-3) and cfg.mode == "sync" and cfg.overlap is False


def test_int_widens_to_float_but_not_the_reverse():
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        TrainConfig.from_dict({"epochs": 2.5})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("epoch=3", "unknown config key 'epoch'"),
        ("batch_size=2000000", "'batch_size' = 2000000 is invalid: must be between 0"),
        ("rho=1", "'rho' = 1.0 is invalid: must be in"),
        ("beta2=-0.1", "'beta2' = -0.1 is invalid"),
        ("server_momentum=1", "'server_momentum' = 1.0 is invalid"),
        ("server_beta1=1.5", "'server_beta1' = 1.5 is invalid"),
        ("server_beta2=-1", "'server_beta2' = -1.0 is invalid"),
        ("activation=heaviside", "'activation' = 'heaviside' is invalid"),
        ("batch_size=-5", "'batch_size' = -5 is invalid"),
        ("lr=fast", "'lr' must be float"),
        ("mode=gossip", "'mode' = 'gossip' is invalid"),
        ("hidden=[1000000000]", "'hidden'"),
        ("hidden=['a']", "'hidden' must be list of ints"),
        ("overlap=maybe", "'overlap' must be bool"),
        ("validation=1.5", "'validation' = 1.5 is invalid"),
        ("ema=1", "'ema' = 1.0 is invalid"),
        ("mmap_threshold_mb=64", "'mmap_threshold_mb' = 64 is invalid: must be between 0"),
        ("noequals", "--set expects key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        TrainConfig().with_overrides([override])
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_toml(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_toml(bad)


def test_learner_keys_default_and_override():
    """The step activation, full batch (0), rmsprop's rho and the server's own momentum and
    Adam betas are ordinary keys, independent of the local ones."""
    cfg = TrainConfig()
    assert (cfg.rho, cfg.beta1, cfg.beta2) == (0.99, 0.9, 0.999)
    assert (cfg.server_momentum, cfg.server_beta1, cfg.server_beta2) == (0.9, 0.9, 0.999)
    cfg = cfg.with_overrides(
        [
            "activation=step",
            "batch_size=0",
            "rho=0.9",
            "momentum=0.5",
            "server_momentum=0.7",
            "server_beta1=0.8",
            "server_beta2=0.95",
        ]
    )
    assert cfg.activation == "step" and cfg.batch_size == 0 and cfg.rho == 0.9
    assert (cfg.momentum, cfg.server_momentum, cfg.server_beta1, cfg.server_beta2) == (0.5, 0.7, 0.8, 0.95)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("min_delta=nan", "'min_delta' = nan is invalid: must be a finite number"),
        ("min_delta=-0.01", "'min_delta' = -0.01 is invalid: must be >= 0"),
        ("min_delta=inf", "'min_delta' = inf is invalid: must be a finite number"),
        ("lr=inf", "'lr' = inf is invalid: must be a finite number"),
        ("lr=nan", "'lr' = nan is invalid"),
        ("weight_decay=inf", "'weight_decay' = inf is invalid: must be a finite number"),
        ("server_lr=inf", "'server_lr' = inf is invalid"),
        ("momentum=nan", "'momentum' = nan is invalid"),
        ("barrier_timeout=inf", "'barrier_timeout' = inf is invalid"),
        ("seed=-1", "'seed' = -1 is invalid: must be between 0 and 4294967295"),
        ("seed=4294967296", "'seed' = 4294967296 is invalid"),
        ("row_cache_mb=-1", "'row_cache_mb' = -1 is invalid: must be >= 0"),
        ("blas_threads=0", "'blas_threads' = 0 is invalid: must be >= 1"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")) as info:
        TrainConfig().with_overrides([override])
    assert "\n" not in str(info.value)
    assert TrainConfig().with_overrides(["seed=4294967295", "min_delta=0"]).seed == 4294967295


@pytest.mark.parametrize(
    "text, fragment",
    [
        # a table name does not prefix its keys: [server] lr would be the local lr
        (
            "lr = 0.01\n[server]\nlr = 0.5\n",
            "'lr' in table [server] would set the local 'lr' (table names only group keys); write server_lr = 0.5",
        ),
        ('[server]\noptimizer = "adam"\n', 'write server_optimizer = "adam"'),
        ("lr = 0.01\n[optimizer]\nlr = 0.5\n", "sets 'lr' twice (top level and [optimizer]); keep one"),
        ("[model]\nepochs = 3\n[data]\nepochs = 4\n", "sets 'epochs' twice ([model] and [data])"),
        (
            "[model]\nhidden = [8]\n[model.deep]\nx = 1\n",
            "table [model.deep] is nested; tables only group keys, one level deep",
        ),
    ],
)
def test_misleading_toml_tables_are_refused(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ) as info:
        TrainConfig.from_toml(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"placement": "federated"}, "placement = 'federated' was replaced by sites (a sites file) or clients"),
        ({"sites": "s.toml", "clients": 4}, "'sites' = 's.toml' and 'clients' = 4 are exclusive"),
        ({"fraction_fit": 0}, "'fraction_fit' = 0.0 is invalid: must be in (0, 1]"),
        ({"min_responses": 1.5}, "'min_responses' = 1.5 is invalid"),
        ({"round_deadline": 0}, "'round_deadline' = 0.0 is invalid"),
        ({"strategy": "scaffold"}, "'strategy' = 'scaffold' is invalid: must be one of"),
        ({"strategy": "fedprox"}, "'strategy' = 'fedprox' needs proximal_mu > 0"),
        ({"aggregator": "krum", "krum_f": 1, "min_clients": 4}, "needs min_clients >= 5"),
        ({"trim_fraction": 0.5}, "'trim_fraction' = 0.5 is invalid: must be in [0, 0.5)"),
        ({"clients": 10, "partition": "column"}, "'partition' = 'column' needs partition_column"),
        ({"partition": "shards"}, "'partition' = 'shards' is invalid"),
        ({"rounds": 0}, "'rounds' = 0 is invalid"),
    ],
)
def test_federation_keys_are_checked(values, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_removed_placement_key_reads_as_before_when_dynamic():
    # configurations saved by earlier runs say placement = "dynamic": they still resume
    assert TrainConfig.from_dict({"placement": "dynamic", "epochs": 3}) == TrainConfig(epochs=3)
    assert "placement" not in TrainConfig.keys()


def test_one_default_top_k_share_on_every_path():
    """The command's configuration, the worker's compressor and the server's job send and expect
    the same share of a top-k delta unless configured: 10%, the share whose accuracy stayed
    within a point of float32's (1% did not, bench/findings.md)."""
    import inspect

    from pipeline.ps.client import ParameterServer
    from pipeline.ps.job import Job
    from pipeline.ps.wire import TOPK_FRACTION, DeltaCompressor, compress, decode_delta

    assert TrainConfig().topk_fraction == TOPK_FRACTION == 0.1
    for f in (DeltaCompressor, Job.create, ParameterServer.create, compress, decode_delta):
        assert inspect.signature(f).parameters["topk_fraction"].default == TOPK_FRACTION, f
