"""Config composition (harness/config.py): bundled groups over the schema, device=auto."""


def test_every_schema_field_is_overridable_through_the_bundled_groups():
    """Group options extend the typed schema (config.register_schemas): a default is
    written once, and any field, even one the option does not mention, takes a plain
    override."""
    from harness import config

    cfg = config.compose("fashion_mnist", ["backend=local", "backend.docker.shm_size=2g",
                                           "backend.slurm.time=00:10:00",
                                           "trainer.num_workers=1",
                                           "determinism=warn", "determinism.threads=1"])
    assert cfg["backend"]["docker"]["shm_size"] == "2g"
    assert cfg["backend"]["slurm"]["time"] == "00:10:00"
    assert cfg["trainer"]["num_workers"] == 1
    assert cfg["determinism"] == {**cfg["determinism"], "mode": "warn", "threads": 1}
    assert cfg["trainer"]["batch_size"] == config.TrainerConf().batch_size


def test_auto_device_of_a_slurm_job_follows_the_gpus_it_asks_for():
    """Decided for the job's node, not the submitting host: cuda exactly when
    backend.slurm.gpus asks the node for GPUs."""
    from harness import config

    assert config.compose("fashion_mnist", ["backend=slurm"])["trainer"]["device"] == "cpu"
    asked = config.compose("fashion_mnist", ["backend=slurm", "backend.slurm.gpus=1"])
    assert asked["trainer"]["device"] == "cuda"
