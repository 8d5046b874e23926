"""Signed runs. `lock_sha256` catches damage, not edits: anyone can recompute it. So every
run that finishes is signed by its launcher with the user's own Ed25519 key, and a replay
asks whose key signed a run before it runs that run's code.

A run is signed twice. At launch, its config, overrides and launch facts
(`launch.sigstore.json`): a resume checks who launched it. At the end, an in-toto Statement
(v1) whose subjects are the run's files and what it used — `harness.lock` (its bytes: any
edit, resealed or not, changes it), `model.pt`, `metrics.jsonl`, a command's kept outputs,
the image id and digest, the data files and the inputs a command read. It goes in a DSSE
envelope in a Sigstore bundle (v0.3, key-based: the key is named by its `hint`), beside the
lock as `harness.lock.sigstore.json`. These are
the formats third-party tools verify offline with a public key (sigstore-python's
`sigstore verify`, cosign's `verify-blob-attestation --key`, in-toto's attestation
verifiers); keyless Sigstore needs the network and is a later option.

The signer's public key is inside the signed statement too (`predicate.signer`), so a run
from an unknown key still verifies as untampered, and its key id can be shown and trusted.
Trusted keys: this user's own key, and the lines of `trusted_keys` in the harness config
directory ($XDG_CONFIG_HOME/harness, default ~/.config/harness) and in `.harness/` of the
working directory (a project's shared list). A line is `ed25519 BASE64 NAME`, the form
`harness keys show` prints.

Ed25519 comes from `cryptography` (maintained, audited, already on most Python installs),
not hand-written code. Only the launcher imports it: training images stay without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import rundir
from harness.digest import file_sha256
from harness.env import SIGNING_KEY
from harness.errors import ConfigError, EnvironmentProblem, LockfileError

BUNDLE = rundir.SIGNATURE
LAUNCH_BUNDLE = rundir.LAUNCH_SIGNATURE
LAUNCH_FILES = (rundir.CONFIG, rundir.OVERRIDES, rundir.LAUNCH)
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:harness:run:v1"
TRUSTED_KEYS = "trusted_keys"
PROJECT_TRUSTED_KEYS = Path(".harness") / TRUSTED_KEYS

UNSIGNED, VALID, INVALID = "unsigned", "valid", "invalid"


# ---------------------------------------------------------------- keys

def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "harness"


def key_path() -> Path:
    return Path(os.environ[SIGNING_KEY]) if os.environ.get(SIGNING_KEY) else \
        config_dir() / "signing-key.pem"


def key_id(public_raw: bytes) -> str:
    """sha256 of the raw 32-byte Ed25519 public key, in hex."""
    return hashlib.sha256(public_raw).hexdigest()


def public_line(public_raw: bytes, name: str) -> str:
    return f"ed25519 {base64.b64encode(public_raw).decode()} {name}"


def init_key(path: Optional[Path] = None) -> Tuple[Path, bool]:
    """(the signing key's path, whether it was made now). An existing key is kept."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path) if path else key_path()
    if path.exists():
        load_private(path)  # a damaged one is said now, not at the first signature
        return path, False
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
    except FileExistsError:  # made at the same moment by another run: use that one
        return path, False
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write a signing key to {path}: {exc.strerror}. Make "
                                 f"{path.parent} writable, or point ${SIGNING_KEY} at a key of "
                                 f"your own (an Ed25519 private key in PEM).") from None
    return path, True


def load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path} is not readable as an unencrypted Ed25519 "
                          f"private key in PEM ({exc}). Fix or remove it (`harness keys init` "
                          f"makes a new one), or point ${SIGNING_KEY} at another.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is a {type(key).__name__}, not Ed25519: "
                          f"runs are signed with Ed25519 keys (`harness keys init`).")
    return key


def public_raw(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)


def own_key_id() -> Optional[str]:
    path = key_path()
    return key_id(public_raw(load_private(path))) if path.exists() else None


def trusted_keys() -> Dict[str, str]:
    """{key id: name} of the keys this user trusts, their own included."""
    trusted: Dict[str, str] = {}
    for path in (config_dir() / TRUSTED_KEYS, Path.cwd() / PROJECT_TRUSTED_KEYS):
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    raw, name = parse_public_line(line, f"{path}:{number}")
                    # A project's list is said as such: a downloaded project's own list
                    # vouches for whoever wrote it.
                    trusted[key_id(raw)] = name if path.parent == config_dir() else \
                        f"{name}, listed in {path}"
    own = own_key_id()
    if own:
        trusted[own] = "your own key"
    return trusted


def parse_public_line(line: str, where: str) -> Tuple[bytes, str]:
    parts = line.split(None, 2)
    try:
        raw = base64.b64decode(parts[1], validate=True) if len(parts) >= 2 else b""
    except ValueError:
        raw = b""
    if len(parts) < 2 or parts[0] != "ed25519" or len(raw) != 32:
        raise ConfigError(f"{where}: not a public key line. Expected `ed25519 BASE64 NAME`, "
                          f"as `harness keys show` prints it.")
    return raw, parts[2].strip() if len(parts) > 2 else key_id(raw)[:16]


def trust(line: str, name: Optional[str] = None) -> Tuple[str, Path]:
    """Add a public key line to this user's trusted_keys; (its key id, the file)."""
    raw, given = parse_public_line(line.strip(), "the key")
    path = config_dir() / TRUSTED_KEYS
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.is_file() else ""
    if key_id(raw) not in {key_id(parse_public_line(x, str(path))[0])
                           for x in existing.splitlines()
                           if x.strip() and not x.lstrip().startswith("#")}:
        with open(path, "a") as handle:
            handle.write(public_line(raw, name or given) + "\n")
    return key_id(raw), path


# ---------------------------------------------------------------- sign

def subjects(run_dir: Path, lock: Dict[str, Any]) -> List[Dict[str, Any]]:
    """What a run's signature covers, as in-toto subjects (name, sha256)."""
    run_dir = Path(run_dir)
    found = [{"name": rundir.LOCK, "digest": {"sha256": file_sha256(run_dir / rundir.LOCK)}}]
    for name in (rundir.WEIGHTS, rundir.METRICS):
        if (run_dir / name).is_file():
            found.append({"name": name, "digest": {"sha256": file_sha256(run_dir / name)}})
    for name in sorted((lock.get("results") or {}).get("outputs") or {}):
        kept = run_dir / rundir.OUTPUTS / name
        if kept.is_file():
            found.append({"name": f"{rundir.OUTPUTS}/{name}",
                          "digest": {"sha256": file_sha256(kept)}})
    image = lock.get("image") or {}
    for field in ("id", "repo_digest"):
        if isinstance(image.get(field), str) and "sha256:" in image[field]:
            found.append({"name": f"image.{field}",
                          "digest": {"sha256": image[field].rsplit("sha256:", 1)[1]}})
    recorded = [("data", (lock.get("data") or {}).get("files") or {}),
                ("input", (lock.get("script") or {}).get("inputs") or {})]
    for kind, files in recorded:
        for name, entry in sorted(files.items()):
            if isinstance(entry, dict) and entry.get("sha256"):
                found.append({"name": f"{kind}/{name}", "digest": {"sha256": entry["sha256"]}})
    return found


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature is over."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign(run_dir: Path, lock: Dict[str, Any]) -> Tuple[str, Path, bool]:
    """Sign a finished run: (key id, key path, whether the key was made now)."""
    return _sign(Path(run_dir) / BUNDLE, subjects(run_dir, lock),
                 {"run_id": lock["run_id"], "lock_sha256": lock["lock_sha256"]})


def sign_launch(run_dir: Path) -> Tuple[str, Path, bool]:
    """Sign a run as it is launched (its config and launch facts): a resume checks who
    launched it before running its code, as a replay checks who finished it."""
    return _sign(Path(run_dir) / LAUNCH_BUNDLE, launch_subjects(run_dir),
                 {"run_id": Path(run_dir).name, "stage": "launch"})


def sign_own_finished(run_dir: Path) -> bool:
    """Sign the finished lock of a run this user's key launched: a batch job's end, seen
    by whoever asks the scheduler (no launcher waits for it). A run someone else launched
    is left as it is: asking about it must not vouch for it. Whether it was signed."""
    from harness.record import lockfile

    own = own_key_id()
    launched = verify_launch(run_dir)
    if own is None or launched.state != VALID or launched.keyid != own or \
            (Path(run_dir) / BUNDLE).exists():
        return False
    sign(run_dir, lockfile.read(Path(run_dir) / rundir.LOCK))
    return True


def launch_subjects(run_dir: Path) -> List[Dict[str, Any]]:
    return [{"name": name, "digest": {"sha256": file_sha256(Path(run_dir) / name)}}
            for name in LAUNCH_FILES if (Path(run_dir) / name).is_file()]


def _sign(path: Path, signed: List[Dict[str, Any]],
          predicate: Dict[str, Any]) -> Tuple[str, Path, bool]:
    key_file, made = init_key()
    private = load_private(key_file)
    raw = public_raw(private)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": signed,
        "predicateType": PREDICATE_TYPE,
        "predicate": {**predicate, "signer": {"keyid": key_id(raw),
                                               "public_key": base64.b64encode(raw).decode()}},
    }
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    signature = private.sign(pae(PAYLOAD_TYPE, payload))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_id(raw)}},
        "dsseEnvelope": {"payloadType": PAYLOAD_TYPE,
                         "payload": base64.b64encode(payload).decode(),
                         "signatures": [{"keyid": key_id(raw),
                                         "sig": base64.b64encode(signature).decode()}]},
    }
    rundir.write_json(path, bundle)
    return key_id(raw), key_file, made


# ---------------------------------------------------------------- verify

@dataclass
class Signature:
    state: str  # UNSIGNED, VALID or INVALID
    keyid: Optional[str] = None
    signer: Optional[str] = None  # the trusted name of the key, None when not trusted
    problem: Optional[str] = None

    @property
    def trusted(self) -> bool:
        return self.state == VALID and self.signer is not None

    def describe(self) -> str:
        if self.state == UNSIGNED:
            return f"unsigned (no {BUNDLE})"
        if self.state == INVALID:
            return f"signature INVALID: {self.problem}"
        if self.signer:
            return f"signed by key {self.keyid[:16]} ({self.signer}, trusted)"
        return f"signed by key {self.keyid[:16]}, which you do not trust"


def verify(run_dir: Path, lock: Dict[str, Any]) -> Signature:
    """Whether the run's bundle is a valid signature over its files as they are now, and
    by whom."""
    return _verify(Path(run_dir) / BUNDLE, subjects(run_dir, lock))


def verify_launch(run_dir: Path) -> Signature:
    """The same for the signature made at launch (config and launch facts)."""
    return _verify(Path(run_dir) / LAUNCH_BUNDLE, launch_subjects(run_dir))


def intact(run_dir: Path, lock: Optional[Dict[str, Any]], then: str,
           refusal: type = LockfileError) -> Signature:
    """The run's signature (its lock's; its launch's when `lock` is None), or `refusal`
    when the files changed after they were signed: `then` says what that means here. An
    unsigned or untrusted run passes: trust.refuse_untrusted decides about those."""
    signature = verify(run_dir, lock) if lock is not None else verify_launch(run_dir)
    if signature.state == INVALID:
        what = "" if lock is not None else "launch "
        raise refusal(f"run {Path(run_dir).name}: {what}{signature.describe()}. {then}")
    return signature


def _verify(path: Path, current: List[Dict[str, Any]]) -> Signature:
    if not path.exists():
        return Signature(UNSIGNED)
    try:
        statement, keyid = _verified_statement(path)
    except (ValueError, KeyError, TypeError) as exc:
        return Signature(INVALID, problem=str(exc))
    now = {s["name"]: s["digest"]["sha256"] for s in current}
    then = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    changed = sorted(name for name in set(now) | set(then) if now.get(name) != then.get(name))
    if changed:
        return Signature(INVALID, keyid, problem=(
            f"{', '.join(changed[:5])} changed since the run was signed (signed sha256 "
            f"{str(then.get(changed[0]))[:16]}..., now {str(now.get(changed[0]))[:16]}...)"))
    return Signature(VALID, keyid, trusted_keys().get(keyid))


def _verified_statement(path: Path) -> Tuple[Dict[str, Any], str]:
    """The bundle's statement and key id, once its signature checks out; ValueError else."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        bundle = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is not readable JSON ({exc})") from None
    envelope = bundle["dsseEnvelope"]
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise ValueError(f"payload type {envelope['payloadType']!r} is not {PAYLOAD_TYPE}")
    payload = base64.b64decode(envelope["payload"])
    statement = json.loads(payload)
    signer = statement["predicate"]["signer"]
    raw = base64.b64decode(signer["public_key"])
    keyid = key_id(raw)
    if keyid != signer["keyid"] or keyid != bundle["verificationMaterial"]["publicKey"]["hint"]:
        raise ValueError("the key named in the bundle is not the key in its statement")
    for entry in envelope["signatures"]:
        if entry["keyid"] != keyid:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(
                base64.b64decode(entry["sig"]), pae(envelope["payloadType"], payload))
        except InvalidSignature:
            raise ValueError("the signature does not match its statement (edited after "
                             "signing)") from None
        return statement, keyid
    raise ValueError(f"no signature by key {keyid[:16]} in the bundle")
