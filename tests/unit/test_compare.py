"""The comparison of two runs (harness/bitwise.py): step, tensors and distance named."""

import json


def _fake_run(directory, losses, params, weight):
    """A run directory with just what the comparison reads."""
    import torch

    directory.mkdir()
    lines = []
    for step, (loss, digest) in enumerate(zip(losses, params), start=1):
        record = {"kind": "train", "step": step, "epoch": 0, "loss": loss, "loss_hex": loss.hex()}
        if digest:
            record["params"] = digest
        lines.append(json.dumps(record, sort_keys=True))
    lines.append(json.dumps({"kind": "eval", "step": len(losses), "accuracy": 0.5,
                             "loss_hex": "0x1p+0"}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({"a.weight": torch.tensor([1.0, 2.0]), "b.bias": torch.tensor([weight])},
               directory / "model.pt")
    return directory


def test_compare_report_names_step_tensor_and_distance(tmp_path):
    from harness.record import bitwise

    same = {"a.weight": "aa", "b.bias": "bb"}
    a = _fake_run(tmp_path / "a", [2.0, 1.5, 1.25, 1.0], [None, same, None, same], 0.5)
    b = _fake_run(tmp_path / "b", [2.0, 1.5, 1.25, 1.125],
                  [None, same, None, {"a.weight": "aa", "b.bias": "cc"}], 0.75)
    report = bitwise.compare_runs(a, b, {"results": {"weights_sha256": "x"}},
                                  {"results": {"weights_sha256": "y"}})
    assert report["verdict"] == bitwise.DIVERGED
    assert report["first_diverging_step"] == 4
    assert report["first_differing_tensors"] == ["b.bias"]
    assert report["max_abs_diff"] == {"b.bias": 0.25}
    text = bitwise.render(report)
    assert "DIVERGED: first diverging step 4" in text and "b.bias: 2.500e-01" in text

    report = bitwise.compare_runs(a, a, {"results": {"weights_sha256": "x"}},
                                  {"results": {"weights_sha256": "x"}})
    assert report["verdict"] == bitwise.IDENTICAL and report["fingerprints_compared"] == 2
    assert bitwise.render(report).startswith("IDENTICAL: 4 steps of loss bits, 2 parameter")
