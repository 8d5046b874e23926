"""Bad input: a clear message naming the fix, exit code 2, and no run directory."""

import pytest
from conftest import ROOT, TESTS


def assert_rejected(done, *phrases):
    assert done.returncode == 2, done.stdout + done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, phrases", [
    (["train", "mnistt"], ["unknown config 'mnistt'", "fashion_mnist", "mnist"]),
    (["train", "fashion_mnist", "trainer.max_stepz=3"],
     ["trainer.max_stepz is not a setting", "Did you mean max_steps?", "cannot be added"]),
    (["train", "fashion_mnist", "+trainer.max_stepz=3"], ["Did you mean max_steps?"]),
    (["train", "fashion_mnist", "optimm.lr=0.1"], ["optimm.lr"]),
    (["train", "fashion_mnist", "trainer.max_steps=abc"], ["trainer.max_steps", "abc"]),
    (["train", "fashion_mnist", "trainer.max_steps=-5"], ["trainer.max_steps=-5", ">= 1"]),
    (["train", "fashion_mnist", "trainer.batch_size=0"], ["trainer.batch_size=0"]),
    (["train", "fashion_mnist", "trainer.op_trace_steps=-1"],
     ["trainer.op_trace_steps=-1", ">= 0"]),
    (["run", "command.op_trace_steps=-2", "--", "true"],
     ["command.op_trace_steps=-2", ">= 0 (0: no op trace)"]),
    (["trace", "diff", "no-such-run", "other"], ["no-such-run"]),
    (["train", "fashion_mnist", "seed=-1"], ["seed=-1"]),
    (["train", "fashion_mnist", "determinism=strictest"], ["determinism", "strictest"]),
    (["train", "fashion_mnist", "determinism.mode=sometimes"], ["determinism.mode"]),
    (["train", "fashion_mnist", "seed=[1,2"], ["seed=[1,2"]),
    (["train", "--resume", "some-run", "seed=3"], ["continues the run with its own config",
                                                    "(seed=3)", "--resume RUN"]),
])
def test_bad_train_input(cli, tmp_path, args, phrases):
    done = cli(*args, "--runs-dir", str(tmp_path / "runs"))
    assert_rejected(done, *phrases)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("override, phrases", [
    ("model._target_=nosuchpkg.Net", ["model._target_=nosuchpkg.Net",
                                      "no module named 'nosuchpkg'", "PYTHONPATH"]),
    ("model._target_=harness.models.NoSuchNet", ["model._target_=harness.models.NoSuchNet",
                                                 "defines no 'NoSuchNet'"]),
    ("data.dataset._target_=harness.nosuchmodule.Data", ["data.dataset._target_",
                                                         "has no module or name 'nosuchmodule'"]),
])
def test_target_that_cannot_be_imported_is_refused_before_launch(cli, tmp_path, override,
                                                                 phrases):
    done = cli("train", "fashion_mnist", override, "--runs-dir", str(tmp_path / "runs"))
    assert_rejected(done, *phrases)
    assert not (tmp_path / "runs").exists()


def test_number_from_an_environment_variable_needs_decoding(cli, tmp_path, monkeypatch):
    """The hint is pasted into a shell as printed, and the override it gives composes."""
    import subprocess

    from harness import config

    done = cli("train", "fashion_mnist", "optim.lr=${oc.env:MYLR}", "--runs-dir",
               str(tmp_path / "runs"), env={"MYLR": "0.05"})
    assert_rejected(done, "optim.lr='0.05' is a string", "${oc.decode:${oc.env:MYLR}}")
    assert not (tmp_path / "runs").exists()
    pasted = done.stderr.split("typed in a shell: ")[1].strip()
    argv = subprocess.run(["bash", "-c", f"printf '%s' {pasted}"], capture_output=True,
                          text=True, check=True).stdout
    monkeypatch.setenv("MYLR", "0.05")
    assert config.compose("fashion_mnist", [argv, "backend=local"])["optim"]["lr"] == 0.05


def test_unknown_backend_lists_valid_ones(cli, tmp_path):
    done = cli("train", "hashy", "backend.name=moon", "--config-dir", str(TESTS / "conf"),
               "--runs-dir", str(tmp_path / "runs"))
    assert_rejected(done, "unknown backend 'moon'", "local")


def test_help_lists_subcommands(cli):
    done = cli("--help", check_rc=0)
    for command in ("train", "data", "lock"):
        assert command in done.stdout
    done = cli("train", "--help", check_rc=0)
    assert "Hydra overrides" in done.stdout


def test_exit_codes_are_one_list_shown_in_help_and_readme(cli):
    """errors.EXIT_CODES is rendered into `--help`; README says the same words."""
    import re

    from harness.errors import exit_codes_text

    def flat(text):
        return re.sub(r"\s+", " ", text)

    assert flat(exit_codes_text()) in flat((ROOT / "README.md").read_text())
    for command in ([], ["train"], ["run"], ["replay"], ["submit"], ["verify"], ["build"]):
        assert flat(exit_codes_text()) in flat(cli(*command, "--help", check_rc=0).stdout)


def test_a_yaml_syntax_error_names_the_file_and_line(cli, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "broken.yaml").write_text("defaults:\n  - fashion_mnist\n  - _self_\n"
                                      "name: [oops\n")
    done = cli("train", "broken", "--config-dir", str(conf), "--runs-dir",
               str(tmp_path / "runs"))
    assert_rejected(done, "is not valid YAML", "broken.yaml", "line 4")
    assert not (tmp_path / "runs").exists()


def test_a_bundled_config_runs_from_a_project_with_its_own_conf(cli, tmp_path, fashion):
    """./conf holds the project's own groups; a bundled config named there composes, and
    can use them."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    cnn = (ROOT / "conf" / "model" / "cnn.yaml").read_text()
    (tmp_path / "conf" / "model" / "mycnn.yaml").write_text(cnn)
    done = cli("train", "fashion_mnist", "model=mycnn", "backend=local", "trainer.max_steps=1",
               "trainer.eval_limit=10", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path,
               check_rc=0)
    assert "succeeded" in done.stdout
