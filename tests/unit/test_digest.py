"""The digests that compare runs see a single flipped bit (in-process): a parameter
fingerprint (metrics.jsonl's `params`), the final weights digest and a checkpoint's state
digest. A fingerprint that missed it would let a changed run compare IDENTICAL."""

import torch

from harness.digest import state_sha256, tensor_digests, weights_sha256


def model_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def flip_one_bit(state, name, index, bit):
    flipped = {k: v.clone() for k, v in state.items()}
    bits = flipped[name].view(-1).view(torch.int32)
    bits[index] ^= 1 << bit
    return flipped


def test_one_flipped_bit_changes_the_fingerprint_of_that_tensor_only():
    state = model_state()
    assert tensor_digests(state) == tensor_digests(model_state())  # the control: repeatable
    for name, index, bit in (("0.weight", 777, 0), ("2.bias", 9, 31), ("0.bias", 0, 12)):
        flipped = flip_one_bit(state, name, index, bit)
        before, after = tensor_digests(state), tensor_digests(flipped)
        assert [k for k in before if before[k] != after[k]] == [name]
        assert weights_sha256(flipped) != weights_sha256(state)
        assert state_sha256({"model": flipped}) != state_sha256({"model": state})


def test_the_fingerprint_reads_the_values_not_the_memory_layout():
    state = model_state()
    strided = {**state, "0.weight": state["0.weight"].t().contiguous().t()}  # same values
    assert not strided["0.weight"].is_contiguous()
    assert tensor_digests(strided) == tensor_digests(state)
    assert weights_sha256(strided) == weights_sha256(state)


def test_a_tree_is_listed_and_hashed_as_rglob_lists_it(tmp_path, monkeypatch):
    """hash_cache.tree_digests walks a directory with one stat per file; the order and the
    files must stay what `sorted(root.rglob("*"))` gave, or every input hash in an old lock
    would change. Links to files count, linked directories are not entered."""
    from harness import hash_cache
    from harness.digest import file_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, outside = tmp_path / "tree", tmp_path / "outside"
    for rel in ("a/b", "a-c", "a.d", "A", "a/b2/x", "z/\u00fc", "sp ace/f"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel * 3)
    outside.mkdir()
    (outside / "o").write_text("outside")
    (root / "link-file").symlink_to(outside / "o")
    (root / "link-dir").symlink_to(outside)
    (root / "dangling").symlink_to(tmp_path / "nothing")

    expected = [(str(p.relative_to(root)), p.stat().st_size, file_sha256(p))
                for p in sorted(root.rglob("*")) if p.is_file()]
    assert [rel for rel, _, _ in expected][:3] == ["A", "a/b", "a/b2/x"]  # parts order
    monkeypatch.setattr(hash_cache, "FRESH_S", 0.0)  # remember files written just now
    hashed = []

    def counted(path):
        hashed.append(path)
        return file_sha256(path)

    assert hash_cache.tree_digests(root, "sha256", counted) == expected
    assert len(hashed) == len(expected)
    assert hash_cache.tree_digests(root, "sha256", counted) == expected  # from the cache:
    assert len(hashed) == len(expected)  # one query for the tree, nothing read again


def test_an_unchanged_tree_is_known_whole_and_any_change_is_seen(tmp_path, monkeypatch):
    """outputs.hash_input of a directory: once every file is settled in the cache, the
    next check is one find(1) listing of the stamps and one query (no per-file walk). An
    edit with its mtime restored, a new file and HARNESS_REHASH=1 each go file by file."""
    import os

    from harness import hash_cache
    from harness.script import files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_REHASH", raising=False)
    root = tmp_path / "inputs"
    for rel in ("a/one", "a/two", "b"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    monkeypatch.setattr(hash_cache, "FRESH_S", 0.0)  # settle files written just now
    first = files.hash_input(root)
    assert first["files"] == 3

    walked = []
    real_walk = hash_cache._walk
    monkeypatch.setattr(hash_cache, "_walk", lambda *a: walked.append(a) or real_walk(*a))
    assert files.hash_input(root) == first and walked == []  # known whole

    edited = root / "a" / "two"
    before = edited.stat()
    edited.write_text("A/TWO")  # same size, mtime put back: only the ctime tells
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = files.hash_input(root)
    assert walked and changed["sha256"] != first["sha256"]
    assert files.hash_input(root) == changed  # settled again, known whole

    walked.clear()
    (root / "c").write_text("new")
    assert files.hash_input(root)["files"] == 4 and walked

    walked.clear()
    monkeypatch.setenv("HARNESS_REHASH", "1")
    assert files.hash_input(root)["files"] == 4 and walked


def test_a_tree_with_a_file_too_fresh_to_remember_is_not_known_whole(tmp_path, monkeypatch):
    from harness import hash_cache
    from harness.script import files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_REHASH", raising=False)
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "f").write_text("just written")  # within FRESH_S: its stamp proves nothing yet
    files.hash_input(root)
    walked = []
    real_walk = hash_cache._walk
    monkeypatch.setattr(hash_cache, "_walk", lambda *a: walked.append(a) or real_walk(*a))
    files.hash_input(root)
    assert walked, "a tree with an unsettled file was taken as known"
