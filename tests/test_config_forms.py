"""The config's forms in one `harness train` launch: Hydra composes it, then it is the
resolved plain data (what config.yaml holds), the typed dataclasses the backend gets, and
config.yaml. Nothing the launcher writes is read back in the same process."""

from collections import Counter

from conftest import FASHION, require

CONVERSIONS = ("to_container", "to_object", "to_yaml")


class CountingOmegaConf:
    """OmegaConf, with the harness's own calls that change the config's form counted."""

    def __init__(self, real, counts):
        self.real, self.counts = real, counts

    def __getattr__(self, name):
        found = getattr(self.real, name)
        if name not in CONVERSIONS:
            return found

        def counted(*args, **kwargs):
            self.counts[name] += 1
            return found(*args, **kwargs)
        return counted


def test_a_launch_converts_the_config_three_times_and_reads_back_nothing(tmp_path,
                                                                           monkeypatch):
    require((FASHION / "train-images-idx3-ubyte.gz").exists(), "run `make data`")
    from omegaconf import OmegaConf

    import harness.config.composition
    import harness.config.schema
    from harness import config, rundir
    from harness.commands import choices, train

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    counts, read = Counter(), []
    for module in (harness.config.composition, harness.config.schema):
        monkeypatch.setattr(module, "OmegaConf", CountingOmegaConf(OmegaConf, counts))
    for module, name in ((config, "load_yaml"), (rundir, "read_json")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, *a, real=real, **k: (
            read.append(str(path)), real(path, *a, **k))[1])
    launched = []
    monkeypatch.setattr(train, "_run", lambda run_dir, cfg, conf, *rest: (
        launched.append((cfg, conf, rest[-1])), run_dir)[1])

    cfg = choices.compose("fashion_mnist", ["backend=local", "trainer.device=cpu"])
    assert counts == {"to_container": 1}  # Hydra's DictConfig, resolved once
    run_dir = train.start(cfg, ["backend=local"], tmp_path / "runs")

    # then typed for the backend, and written as config.yaml: three in all
    assert counts == {"to_container": 1, "to_object": 1, "to_yaml": 1}
    [(handed, conf, host_facts)] = launched
    assert handed is cfg and conf.trainer.device == "cpu"
    assert host_facts["config_sha256"] == config.config_sha256(cfg)
    assert [path for path in read if str(run_dir) in path] == []
    # The control: a read of what the launcher wrote is seen.
    rundir.read_json(run_dir / rundir.LAUNCH)
    assert [path for path in read if str(run_dir) in path] == [str(run_dir / rundir.LAUNCH)]
