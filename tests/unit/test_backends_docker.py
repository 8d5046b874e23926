"""The Docker backend's GPU request (harness/backends/docker.py), without an engine."""


def test_gpu_request_uses_cdi_where_the_engine_has_an_nvidia_spec(tmp_path):
    from harness.backends.docker import gpu_request

    classic = gpu_request("all", {})
    assert classic["Capabilities"] == [["gpu"]] and classic["Count"] == -1
    (tmp_path / "other.yaml").write_text("kind: vendor.com/fpga\n")
    assert gpu_request("2", {"CDISpecDirs": [str(tmp_path)]})["Count"] == 2
    (tmp_path / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    cdi = gpu_request("all", {"CDISpecDirs": [str(tmp_path), "/nonexistent"]})
    assert cdi["Driver"] == "cdi" and cdi["DeviceIDs"] == ["nvidia.com/gpu=all"]
    assert gpu_request("2", {"CDISpecDirs": [str(tmp_path)]})["DeviceIDs"] == \
        ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
