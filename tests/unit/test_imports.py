"""Reading installed distributions (harness/script/imports.py): a package's name and version."""


def test_package_versions_are_read_from_the_metadata_headers(tmp_path):
    """The fast reader of a distribution's name and version agrees with importlib's
    email parser on every package of this venv, and stops at the end of the headers (a
    long description may hold lines that look like headers)."""
    import importlib.metadata as metadata

    from harness.script.imports import name_and_version

    for dist in metadata.distributions():
        assert name_and_version(dist) == ((dist.metadata.get("Name") or "").lower(),
                                          dist.version)
    info = tmp_path / "fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: Fake_Pkg\nVersion: 1.0\n\n"
                                   "Name: not-this\nVersion: 9.9\n")
    assert name_and_version(metadata.PathDistribution(info)) == ("fake_pkg", "1.0")
