"""Config composition (harness/config/schema.py): bundled groups over the schema, device=auto."""


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
    from harness.commands import choices

    assert choices.compose("fashion_mnist", ["backend=slurm"])["trainer"]["device"] == "cpu"
    asked = choices.compose("fashion_mnist", ["backend=slurm", "backend.slurm.gpus=1"])
    assert asked["trainer"]["device"] == "cuda"
    # config alone chooses nothing: composing and validating leave auto and a null seed
    # to the command (harness/commands/choices.py), which records its choice.
    composed = config.compose("fashion_mnist", ["backend=slurm", "seed=null"])
    assert composed["trainer"]["device"] == "auto" and composed["seed"] is None
    chosen = choices.choose(composed)
    assert chosen["trainer"]["device"] == "cpu" and 0 <= chosen["seed"] < config.SEED_LIMIT


def test_the_seed_limit_is_one_number():
    from harness import config
    from harness.training import seeding

    assert config.SEED_LIMIT == seeding.SEED_LIMIT == 2**32
