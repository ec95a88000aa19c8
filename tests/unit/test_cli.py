"""The ``kvtier`` admin CLI end to end, against real tiers: a ``kvtier serve`` subprocess and
real ``redis-server`` processes (no mocks).

Every command runs at least once through the installed ``kvtier`` console script; the
slow-to-start ``explain`` (it imports vLLM to hash prompts) otherwise runs in-process
through typer's CliRunner on :data:`kvtier.cli.app`.

The populated tier is what a connector would leave behind, built without an engine:
namespace manifests like the connector writes, and blocks keyed by vLLM-identical
prompt hashes (:func:`kvtier.hashing.prompt_block_hashes`):

- namespace MAIN (tiny-qwen3next, 3 state groups + 1 attention group, 384-token blocks):
  - prompt FULL: attention blocks and the 3 states at boundaries 1..5 (a full hit);
  - prompt EVICTED: the same, then the attention block at boundary 3 deleted;
  - prompt NOSTATE: the same, then group 1's state at boundary 5 deleted;
- namespace OTHER (same model, another layout): prompt MISMATCH, complete;
- prompt NOTHING is stored nowhere.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvtier import payload
from kvtier.backends import Backend, open_backend
from kvtier.backends.base import PutItem
from kvtier.cli import app
from kvtier.keys import BlockKey, Namespace, fingerprint, manifest_key
from kvtier.manifest import GroupInfo, NamespaceManifest
from kvtier.testing.redis_servers import RedisServer
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import make_prompt_token_ids

MODEL = "tiny-qwen3next"
BLOCK = 384
PROMPT_TOKENS = 2000  # boundaries 1..5 restorable: (2000 - 1) // 384 == 5
BOUNDARIES = 5
STATE_GROUPS = (0, 1, 2)
ATTN_GROUP = 3
ATTN_DATA = 3000  # payload bytes of one attention block (header comes on top)
STATE_DATA = 1000
SEEDS = {"full": 1, "evicted": 2, "nostate": 3, "mismatch": 4, "nothing": 5}
EVICTED_AT = 3  # attention block deleted at this boundary
NOSTATE_GROUP, NOSTATE_AT = 1, 5  # state deleted for this group at this boundary

_exe = Path(sys.executable).with_name("kvtier")
KVTIER = str(_exe) if _exe.exists() else shutil.which("kvtier")


# -- running the CLI -------------------------------------------------------------------------
@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _env(columns: int = 200) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_URL"}
    env["COLUMNS"] = str(columns)  # default: tables wide enough that nothing is truncated
    return env


def kvtier(*args: str, timeout: float = 120, columns: int = 200) -> Run:
    """The installed console script, stdin not a terminal."""
    assert KVTIER, "the kvtier console script is not installed (pip install -e .)"
    p = subprocess.run([KVTIER, *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=_env(columns))
    return Run(p.returncode, p.stdout, p.stderr)


def invoke(*args: str) -> Run:
    """The same app in-process (for commands whose start-up is slow)."""
    r = CliRunner().invoke(app, list(args), env={"KVTIER_URL": None, "COLUMNS": "200"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Run(r.exit_code, r.stdout, r.stderr)


def assert_usage_error(r: Run, *needles: str) -> None:
    """Exit 2, one line on stderr saying what to fix, no traceback."""
    assert r.code == 2, (r.code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# -- a populated tier --------------------------------------------------------------------------
@functools.cache
def prompt(name: str) -> tuple[list[int], list[bytes]]:
    from kvtier.hashing import prompt_block_hashes

    ids = make_prompt_token_ids(PROMPT_TOKENS, SEEDS[name], 4096)
    return ids, prompt_block_hashes(ids, BLOCK, "sha256")


def manifest(ns: bytes, layout: str) -> NamespaceManifest:
    groups = [GroupInfo(g, "state", BLOCK) for g in STATE_GROUPS]
    groups.append(GroupInfo(ATTN_GROUP, "attention", BLOCK))
    return NamespaceManifest(namespace=ns.hex(), model=MODEL, layout=layout, groups=groups,
                             boundary_tokens=BLOCK, hash_block_size=BLOCK, hash_algo="sha256")


@dataclass
class Populated:
    main: str  # namespace hex
    other: str
    values: dict[bytes, bytes] = field(default_factory=dict)  # key -> stored value (kept only)
    manifest_bytes: int = 0
    manifests: int = 2

    def blocks(self, ns: str) -> dict[bytes, bytes]:
        return {k: v for k, v in self.values.items() if k.split(b":")[1].decode() == ns}

    @property
    def entries(self) -> int:
        return len(self.values) + self.manifests

    def key(self, name: str, group: int, boundary: int) -> str:
        """Key of prompt ``name``'s block of ``group`` at ``boundary`` in namespace MAIN."""
        _, hashes = prompt(name)
        return BlockKey(bytes.fromhex(self.main), 0, group, hashes[boundary - 1]).encode().decode()


def _prefix_items(ns: bytes, hashes: list[bytes], layout: bytes) -> list[PutItem]:
    """Attention chain + the states at each boundary (state's parent: attention block there)."""
    items, parent = [], None
    for b in range(1, BOUNDARIES + 1):
        k = BlockKey(ns, 0, ATTN_GROUP, hashes[b - 1])
        items.append(PutItem(k.encode(), payload.encode(k, layout, os.urandom(ATTN_DATA)), parent))
        parent = k.encode()
        for g in STATE_GROUPS:
            s = BlockKey(ns, 0, g, hashes[b - 1])
            items.append(PutItem(s.encode(), payload.encode(s, layout, os.urandom(STATE_DATA)),
                                 parent))
    return items


def populate(b: Backend, tenant: str = "") -> Populated:
    lay_main, lay_other = fingerprint({"dtype": "bf16"}), fingerprint({"dtype": "fp8"})
    ns_main = Namespace(MODEL, lay_main, tenant).id
    ns_other = Namespace(MODEL, lay_other, tenant).id
    digest_main, digest_other = payload.layout_digest(lay_main), payload.layout_digest(lay_other)
    items = [PutItem(manifest_key(ns_main), manifest(ns_main, lay_main).to_bytes()),
             PutItem(manifest_key(ns_other), manifest(ns_other, lay_other).to_bytes())]
    for name in ("full", "evicted", "nostate"):
        items += _prefix_items(ns_main, prompt(name)[1], digest_main)
    items += _prefix_items(ns_other, prompt("mismatch")[1], digest_other)
    assert b.put_many(items) == len(items)
    pop = Populated(ns_main.hex(), ns_other.hex(),
                    {it.key: it.value for it in items if not it.key.endswith(b":manifest")},
                    len(items[0].value) + len(items[1].value))
    gone = [pop.key("evicted", ATTN_GROUP, EVICTED_AT).encode(),
            pop.key("nostate", NOSTATE_GROUP, NOSTATE_AT).encode()]
    assert b.delete_many(gone) == 2
    for k in gone:
        del pop.values[k]
    return pop


CAPACITY = "256MiB"
MEDIA = ["grpc", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(scope="module")
def tier() -> Iterator[tuple[str, Populated]]:
    """A ``kvtier serve`` holding the populated tier; tests using it only read."""
    with TierProcess(capacity=CAPACITY) as t, open_backend(t.url) as b:
        yield t.url, populate(b)


@pytest.fixture
def fresh_tier() -> Iterator[tuple[str, Populated]]:
    """The same, private to one test (which may change it)."""
    with TierProcess(capacity=CAPACITY) as t, open_backend(t.url) as b:
        yield t.url, populate(b)


@pytest.fixture(scope="module")
def redis_tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Populated]]:
    """A real standalone redis-server of this module's own, populated the same way."""
    from kvtier.testing.redis_servers import ensure_redis_server, redis_standalone

    ensure_redis_server()
    with redis_standalone(tmp_path_factory.mktemp("cli-redis")) as srv:
        url = srv.url()
        with open_backend(url) as b:
            yield url, populate(b)


def _populated_redis(srv: RedisServer) -> tuple[str, Populated]:
    url = srv.url()
    with open_backend(url) as b:
        return url, populate(b)


# -- stats ----------------------------------------------------------------------------------
def test_stats_grpc(tier) -> None:
    url, pop = tier
    r = kvtier("stats", "--url", url, "--json")
    assert r.code == 0, r.stderr
    s = r.json()
    assert s["backend"] == "memory"
    assert s["entries"] == pop.entries == 80
    assert s["capacity_bytes"] == 256 << 20
    assert s["bytes_used"] == sum(map(len, pop.values.values())) + pop.manifest_bytes
    assert s["evictions"] == 0 and s["pinned"] == 0
    assert s["extra"]["policy"] == "value"  # the default

    human = kvtier("stats", "--url", url)
    assert human.code == 0
    for word in ("metric", "value", "entries", "capacity_bytes", "268,435,456"):
        assert word in human.stdout


@pytest.mark.redis
def test_stats_redis(redis_tier) -> None:
    url, pop = redis_tier
    r = kvtier("stats", "--url", url, "--json")
    assert r.code == 0, r.stderr
    s = r.json()
    assert s["backend"] == "redis"
    assert s["entries"] == pop.entries  # its own server: every key is kvtier's
    assert s["extra"]["mode"] == "standalone"
    assert s["bytes_used"] > 0
    human = kvtier("stats", "--url", url)
    assert human.code == 0 and "metric" in human.stdout and "redis_version" in human.stdout


# -- ls -------------------------------------------------------------------------------------
def _check_ls(rows: list[dict], pop: Populated) -> None:
    by_ns = {r["namespace"]: r for r in rows}
    assert set(by_ns) == {pop.main, pop.other}
    main, other = by_ns[pop.main], by_ns[pop.other]
    assert main["model"] == other["model"] == MODEL
    assert main["boundary_tokens"] == other["boundary_tokens"] == BLOCK
    assert main["groups"] == other["groups"] == [0, 1, 2, 3]
    assert main["blocks"] == 3 * BOUNDARIES * 4 - 2 == len(pop.blocks(pop.main))
    assert other["blocks"] == BOUNDARIES * 4 == len(pop.blocks(pop.other))
    assert main["bytes"] == sum(map(len, pop.blocks(pop.main).values()))
    assert other["bytes"] == sum(map(len, pop.blocks(pop.other).values()))


@pytest.mark.parametrize("medium", MEDIA)
def test_ls(medium: str, request: pytest.FixtureRequest) -> None:
    url, pop = request.getfixturevalue("tier" if medium == "grpc" else "redis_tier")
    r = kvtier("ls", "--url", url, "--json")
    assert r.code == 0, r.stderr
    _check_ls(r.json(), pop)

    human = kvtier("ls", "--url", url)
    assert human.code == 0
    for word in ("namespace", "model", "boundary", "blocks", "bytes", MODEL):
        assert word in human.stdout
    # Both namespaces in full, so they can be pasted into `-n`.
    assert pop.main in human.stdout and pop.other in human.stdout


def test_ls_namespace_column_never_truncated_on_narrow_terminal(tier) -> None:
    url, pop = tier
    r = kvtier("ls", "--url", url, columns=80)
    assert r.code == 0, r.stderr
    assert pop.main in r.stdout and pop.other in r.stdout, r.stdout


@pytest.mark.parametrize("medium", MEDIA)
def test_ls_namespace_blocks(medium: str, request: pytest.FixtureRequest) -> None:
    url, pop = request.getfixturevalue("tier" if medium == "grpc" else "redis_tier")
    r = kvtier("ls", "--url", url, "-n", pop.main, "--limit", "1000", "--json")
    assert r.code == 0, r.stderr
    rows = r.json()
    want = pop.blocks(pop.main)
    assert {row["key"].encode() for row in rows} == set(want)  # no manifest among them
    for row in rows:
        k = BlockKey.decode(row["key"])
        assert (row["group"], row["rank"], row["hash"]) == (k.group, 0, k.block_hash.hex())
        assert row["bytes"] == len(want[row["key"].encode()])
        assert row["pinned"] is False
    assert sum(row["group"] == ATTN_GROUP for row in rows) == 3 * BOUNDARIES - 1

    limited = kvtier("ls", "--url", url, "-n", pop.other, "--limit", "7", "--json")
    assert limited.code == 0 and len(limited.json()) == 7

    human = kvtier("ls", "--url", url, "-n", pop.other)
    assert human.code == 0
    for word in ("group", "rank", "hash", "bytes", "pinned", pop.other):
        assert word in human.stdout


def test_ls_survives_a_damaged_manifest(fresh_tier) -> None:
    url, pop = fresh_tier
    with open_backend(url) as b:
        b.delete_many([manifest_key(bytes.fromhex(pop.other))])
        b.put_many([PutItem(manifest_key(bytes.fromhex(pop.other)), b"{not json")])
    r = kvtier("ls", "--url", url, "--json")
    assert r.code == 0, r.stderr
    rows = {row["namespace"]: row for row in r.json()}
    assert rows[pop.other]["model"] is None and rows[pop.other]["blocks"] == 20
    assert rows[pop.main]["model"] == MODEL
    human = kvtier("ls", "--url", url)
    assert human.code == 0 and "?" in human.stdout


# -- inspect ---------------------------------------------------------------------------------
@pytest.mark.parametrize("medium", MEDIA)
def test_inspect_valid_block(medium: str, request: pytest.FixtureRequest) -> None:
    url, pop = request.getfixturevalue("tier" if medium == "grpc" else "redis_tier")
    key = pop.key("full", ATTN_GROUP, 2)
    r = kvtier("inspect", key, "--url", url, "--json")
    assert r.code == 0, r.stderr
    info = r.json()
    assert info["valid"] is True and info["key_matches"] is True
    assert info["key"] == key and info["namespace"] == pop.main
    assert info["group"] == ATTN_GROUP and info["rank"] == 0
    assert info["hash"] == prompt("full")[1][1].hex()
    assert info["data_bytes"] == ATTN_DATA
    assert info["stored_bytes"] == ATTN_DATA + payload.HEADER_SIZE
    assert info["layout"] == payload.layout_digest(fingerprint({"dtype": "bf16"})).hex()

    assert info["decode"] is False, "a prefill-written block"
    state = kvtier("inspect", pop.key("full", 0, 5), "--url", url)
    assert state.code == 0, state.stderr
    for word in ("field", "value", "valid", "True", prompt("full")[1][4].hex()):
        assert word in state.stdout


def test_inspect_shows_decode_written_blocks(fresh_tier) -> None:
    """README: decode-written payloads carry FLAG_DECODE and `kvtier inspect` shows it."""
    url, pop = fresh_tier
    key = pop.key("nothing", 0, 1)
    k = BlockKey.decode(key)
    layout = payload.layout_digest(fingerprint({"dtype": "bf16"}))
    with open_backend(url) as b:
        assert b.put_many([PutItem(key.encode(), payload.encode(
            k, layout, os.urandom(STATE_DATA), payload.FLAG_DECODE))]) == 1
    r = kvtier("inspect", key, "--url", url, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["decode"] is True and r.json()["valid"] is True
    human = kvtier("inspect", key, "--url", url)
    assert human.code == 0 and "decode" in human.stdout and "True" in human.stdout


def _corrupt_cases(pop: Populated) -> list[tuple[str, bytes, str]]:
    """(key, stored value, expected problem) for damaged values under valid keys."""
    key = pop.key("full", ATTN_GROUP, 1)
    good = pop.values[key.encode()]
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    other_key = pop.key("full", ATTN_GROUP, 2).encode()
    return [
        (key, bytes(flipped), "checksum"),
        (pop.key("full", 0, 1), good[:20], "truncated"),
        # a valid payload, but of another block
        (pop.key("full", 1, 1), pop.values[other_key], "different key"),
    ]


def _check_corrupt(url: str, pop: Populated) -> None:
    for key, _value, problem in _corrupt_cases(pop):
        r = kvtier("inspect", key, "--url", url, "--json")
        assert r.code == 1, (key, r.stdout, r.stderr)
        info = r.json()
        assert info["valid"] is False and problem in info["problem"], info
        assert "Traceback" not in r.stderr
    human = kvtier("inspect", _corrupt_cases(pop)[0][0], "--url", url)
    assert human.code == 1 and "False" in human.stdout and "checksum" in human.stdout
    gone = kvtier("inspect", pop.key("nothing", ATTN_GROUP, 1), "--url", url)
    assert gone.code == 1 and "no block stored" in gone.stderr


def test_inspect_corrupt_grpc(fresh_tier) -> None:
    url, pop = fresh_tier
    with open_backend(url) as b:
        cases = _corrupt_cases(pop)
        b.delete_many([k.encode() for k, _, _ in cases])
        assert b.put_many([PutItem(k.encode(), v) for k, v, _ in cases]) == len(cases)
    _check_corrupt(url, pop)


@pytest.mark.redis
def test_inspect_corrupt_redis(redis_private) -> None:
    url, pop = _populated_redis(redis_private)
    admin = redis_private.client()
    for k, v, _ in _corrupt_cases(pop):
        admin.set(k, v)
    _check_corrupt(url, pop)


# -- explain --------------------------------------------------------------------------------
# scenario -> (prompt, namespace attr, hit boundary, reason, words of `why`, presence at rows)
def _expected(pop: Populated) -> dict[str, tuple]:
    all_present = [[True] * 4 for _ in range(BOUNDARIES)]
    evicted = [list(p) for p in all_present]
    evicted[EVICTED_AT - 1][3] = False
    nostate = [list(p) for p in all_present]
    nostate[NOSTATE_AT - 1][NOSTATE_GROUP] = False
    none = [[False] * 4 for _ in range(BOUNDARIES)]
    return {
        "full": ("full", pop.main, 5, "full", ["every boundary", "restorable"], all_present),
        "evicted_parent": ("evicted", pop.main, EVICTED_AT - 1, "missing_attention_block",
                           ["attention block of group 3 missing at boundary 3",
                            "evicted parent"], evicted),
        "missing_state": ("nostate", pop.main, NOSTATE_AT - 1, "missing_state",
                          ["boundary 5 has its attention blocks",
                           "no recurrent state for group(s) 1"], nostate),
        "layout_mismatch": ("mismatch", pop.main, 0, "missing_attention_block",
                            ["layout mismatch", f"namespace {pop.other} holds it"], none),
        "nothing_stored": ("nothing", pop.main, 0, "missing_attention_block",
                           ["nothing of this prompt is stored"], none),
        "mismatch_own_namespace": ("mismatch", pop.other, 5, "full", ["every boundary"],
                                   all_present),
    }


def _check_explain(report: dict, pop: Populated, scenario: str) -> None:
    name, ns, hit, reason, words, present = _expected(pop)[scenario]
    assert report["namespace"] == ns and report["model"] == MODEL
    assert report["tokens"] == PROMPT_TOKENS
    assert report["groups"] == [{"group_id": 0, "kind": "state"}, {"group_id": 1, "kind": "state"},
                                {"group_id": 2, "kind": "state"},
                                {"group_id": 3, "kind": "attention"}]
    assert report["hit_boundary"] == hit
    assert report["hit_tokens"] == hit * BLOCK
    assert report["reason"] == reason
    assert [r["boundary"] for r in report["boundaries"]] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in report["boundaries"]] == [384, 768, 1152, 1536, 1920]
    assert [r["present"] for r in report["boundaries"]] == present
    assert [r["restorable"] for r in report["boundaries"]] == [b <= hit for b in range(1, 6)]
    for w in words:
        assert w in report["why"], (w, report["why"])


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prompts")
    out = {}
    for name in SEEDS:
        p = d / f"{name}.json"
        p.write_text(json.dumps(prompt(name)[0]))
        out[name] = p
    short = d / "short.json"  # exactly one boundary: vLLM must still compute its last token
    short.write_text(json.dumps(prompt("full")[0][:BLOCK]))
    out["short"] = short
    return out


def test_explain_full_hit_console_script(tier, token_files) -> None:
    """The one explain through the executable: it imports vLLM to hash, so it starts slowly."""
    url, pop = tier
    r = kvtier("explain", "--url", url, "-n", pop.main, "--token-file",
               str(token_files["full"]), "--json", timeout=300)
    assert r.code == 0, r.stderr
    _check_explain(r.json(), pop, "full")



def test_explain_human_output(tier, token_files) -> None:
    url, pop = tier
    human = invoke("explain", "--url", url, "-n", pop.main, "--token-file",
                   str(token_files["evicted"]))
    assert human.code == 0, human.stderr
    for word in ("boundary", "tokens", "g0 state", "g3 attention", "restorable",
                 "hit the connector would report: 768 tokens", "evicted parent"):
        assert word in human.stdout, word


@pytest.mark.parametrize("scenario", ["full", "evicted_parent", "missing_state",
                                      "layout_mismatch", "nothing_stored",
                                      "mismatch_own_namespace"])
@pytest.mark.parametrize("medium", MEDIA)
def test_explain(medium: str, scenario: str, request: pytest.FixtureRequest,
                 token_files) -> None:
    url, pop = request.getfixturevalue("tier" if medium == "grpc" else "redis_tier")
    name, ns, *_ = _expected(pop)[scenario]
    r = invoke("explain", "--url", url, "-n", ns, "--token-file", str(token_files[name]),
               "--json")
    assert r.code == 0, r.stderr
    _check_explain(json.loads(r.stdout), pop, scenario)


def test_explain_token_ids_option(tier) -> None:
    url, pop = tier
    ids = prompt("nostate")[0]
    r = invoke("explain", "--url", url, "-n", pop.main, "--token-ids", ",".join(map(str, ids)),
               "--json")
    assert r.code == 0, r.stderr
    _check_explain(json.loads(r.stdout), pop, "missing_state")


@pytest.mark.parametrize("medium", MEDIA)
def test_explain_one_boundary_prompt_hits_nothing(medium: str, request: pytest.FixtureRequest,
                                                  token_files) -> None:
    """A 384-token prompt: its one boundary is stored, but vLLM must compute the last token,
    so nothing may be restored (regression: over gRPC a cap of 0 meant "no cap")."""
    url, pop = request.getfixturevalue("tier" if medium == "grpc" else "redis_tier")
    r = invoke("explain", "--url", url, "-n", pop.main, "--token-file",
               str(token_files["short"]), "--json")
    assert r.code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["hit_tokens"] == 0 and rep["boundaries"] == []
    assert "shorter than one boundary" in rep["why"]


def test_explain_prompt_text_with_tokenizer(fresh_tier) -> None:
    """``--prompt`` + ``--tokenizer``: the text is tokenized, hashed and looked up like ids."""
    from transformers import AutoTokenizer

    from kvtier.hashing import prompt_block_hashes
    from kvtier.testing.tiny_model import build_model

    url, pop = fresh_tier
    model_dir = str(build_model("tiny"))
    text = " ".join(f"item {i} of the list" for i in range(300))
    ids = AutoTokenizer.from_pretrained(model_dir).encode(text)
    assert len(ids) > (BOUNDARIES + 2) * BLOCK
    with open_backend(url) as b:  # the first 5 boundaries of this prompt are stored
        b.put_many(_prefix_items(bytes.fromhex(pop.main), prompt_block_hashes(ids, BLOCK),
                                 payload.layout_digest("t")))
    r = invoke("explain", "--url", url, "-n", pop.main, "--prompt", text, "--tokenizer",
               model_dir, "--json")
    assert r.code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tokens"] == len(ids)
    assert len(rep["boundaries"]) == (len(ids) - 1) // BLOCK
    assert rep["hit_tokens"] == BOUNDARIES * BLOCK and rep["reason"] == "missing_attention_block"
    assert "stop at boundary 5 (not stored further)" in rep["why"]

    r = kvtier("explain", "--url", url, "-n", pop.main, "--prompt", text, columns=80)
    assert_usage_error(r, "--prompt needs --tokenizer")


def test_explain_needs_namespace_when_several(tier, token_files) -> None:
    url, pop = tier
    r = kvtier("explain", "--url", url, "--token-file", str(token_files["full"]))
    assert_usage_error(r, "--namespace", pop.main, pop.other, MODEL)


# -- health -----------------------------------------------------------------------------------
@pytest.mark.redis
def test_health(tier, redis_tier) -> None:
    url, pop = tier
    r = kvtier("health", "--url", url, "--json")
    assert r.code == 0, r.stderr
    h = r.json()
    assert h["ok"] is True and h["backend"] == "memory" and h["entries"] == pop.entries
    assert h["url"] == url
    human = kvtier("health", "--url", url)
    assert human.code == 0 and "ok" in human.stdout

    rurl, _ = redis_tier
    r = kvtier("health", "--url", rurl, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["ok"] is True and r.json()["backend"] == "redis"


def test_health_down() -> None:
    from kvtier.testing.tier_proc import free_port

    url = f"grpc://127.0.0.1:{free_port()}"
    r = kvtier("health", "--url", url, "--json")
    assert r.code == 1
    h = r.json()
    assert h["ok"] is False and h["url"] == url and "UNAVAILABLE" in h["error"]
    human = kvtier("health", "--url", url, columns=80)
    assert human.code == 1 and human.stderr.startswith("error: ")
    assert "Traceback" not in human.stderr and len(human.stderr.strip().splitlines()) == 1

    dead_redis = kvtier("health", "--url", f"redis://127.0.0.1:{free_port()}", columns=80)
    assert dead_redis.code == 1 and "is redis-server running" in dead_redis.stderr
    assert len(dead_redis.stderr.strip().splitlines()) == 1


# -- evict ------------------------------------------------------------------------------------
def test_evict(fresh_tier, token_files) -> None:
    url, pop = fresh_tier
    k1, k2 = pop.key("full", 0, 5), pop.key("full", 1, 5)
    r = kvtier("evict", k1, k2, "--url", url, "--json")
    assert r.code == 0, r.stderr
    assert r.json() == {"evicted": 2, "asked": 2}
    with open_backend(url) as b:
        assert b.contains_many([k1.encode(), k2.encode()]) == [False, False]
        assert b.stats().entries == pop.entries - 2
    # explain now stops before the states just evicted
    ex = invoke("explain", "--url", url, "-n", pop.main, "--token-file",
                str(token_files["full"]), "--json")
    assert json.loads(ex.stdout)["hit_tokens"] == 4 * BLOCK

    again = kvtier("evict", k1, "--url", url, "--json")
    assert again.code == 0 and again.json() == {"evicted": 0, "asked": 1}

    whole = kvtier("evict", "--url", url, "-n", pop.other, "--json")
    assert whole.code == 0, whole.stderr
    assert whole.json() == {"evicted": 20, "asked": 20}  # blocks only: the manifest stays
    rows = {r["namespace"]: r for r in kvtier("ls", "--url", url, "--json").json()}
    assert rows[pop.other]["blocks"] == 0 and rows[pop.other]["model"] == MODEL
    assert rows[pop.main]["blocks"] == len(pop.blocks(pop.main)) - 2

    human = kvtier("evict", pop.key("full", 2, 5), "--url", url)
    assert human.code == 0 and "evicted" in human.stdout


def test_evict_many_keys_in_batches(fresh_tier) -> None:
    """More keys than one batch (512): the progress path, counted exactly."""
    url, _ = fresh_tier
    ns = os.urandom(16)
    keys = [BlockKey(ns, 0, 3, os.urandom(32)).encode() for _ in range(1100)]
    with open_backend(url) as b:
        assert b.put_many([PutItem(k, payload.encode(BlockKey.decode(k),
                                                     payload.layout_digest("x"), b"z"))
                           for k in keys]) == len(keys)
    r = kvtier("evict", "--url", url, "-n", ns.hex(), "--json")
    assert r.code == 0 and r.json() == {"evicted": 1100, "asked": 1100}


# -- pin / unpin --------------------------------------------------------------------------------
DATA = 4096
SMALL = "64KiB"  # 15 blocks of 4096 + header bytes


def _blocks(ns: bytes, n: int) -> list[PutItem]:
    out = []
    for _ in range(n):
        k = BlockKey(ns, 0, 3, os.urandom(32))
        out.append(PutItem(k.encode(), payload.encode(k, payload.layout_digest("p"),
                                                       os.urandom(DATA))))
    return out


def test_pin_survives_eviction_and_unpin_releases() -> None:
    with TierProcess(capacity=SMALL) as t, open_backend(t.url) as b:
        fits = (64 << 10) // (DATA + payload.HEADER_SIZE)
        ns, filler = os.urandom(16), os.urandom(16)
        first = _blocks(ns, 10)
        assert b.put_many(first) == 10
        pinned = [it.key.decode() for it in first[:4]]
        r = kvtier("pin", *pinned, "--url", t.url, "--json")
        assert r.code == 0, r.stderr
        assert r.json() == {"pinned": 4, "asked": 4}
        assert b.stats().pinned == 4
        rows = {row["key"]: row["pinned"]
                for row in kvtier("ls", "--url", t.url, "-n", ns.hex(), "--json").json()}
        assert rows == {it.key.decode(): it.key.decode() in pinned for it in first}

        # Eviction pressure: three times the capacity of other blocks.
        for _ in range(3):
            assert b.put_many(_blocks(filler, fits)) == fits
        s = b.stats()
        assert s.evictions > 0 and s.pinned == 4 and s.entries == fits
        assert b.contains_many([it.key for it in first]) == [True] * 4 + [False] * 6

        un = kvtier("unpin", "--url", t.url, "-n", ns.hex(), "--json")
        assert un.code == 0, un.stderr
        assert un.json() == {"unpinned": 4, "asked": 4}
        assert b.stats().pinned == 0
        assert b.put_many(_blocks(filler, fits)) == fits
        assert b.contains_many([it.key for it in first[:4]]) == [False] * 4

        # -n selects the namespace's blocks; a human gets a summary
        again = _blocks(ns, 3)
        b.put_many(again)
        human = kvtier("pin", "--url", t.url, "-n", ns.hex())
        assert human.code == 0 and "pinned" in human.stdout
        assert b.stats().pinned == 3


def test_pin_unknown_keys_count_zero(tier) -> None:
    url, pop = tier
    r = kvtier("pin", pop.key("nothing", 0, 1), "--url", url, "--json")
    assert r.code == 0 and r.json() == {"pinned": 0, "asked": 1}
    r = kvtier("unpin", pop.key("nothing", 0, 1), "--url", url, "--json")
    assert r.code == 0 and r.json() == {"unpinned": 0, "asked": 1}


# -- flush --------------------------------------------------------------------------------------
def test_flush_grpc(fresh_tier) -> None:
    url, pop = fresh_tier
    r = kvtier("flush", "--url", url)
    assert_usage_error(r, "refusing to flush ALL kvtier blocks", "--yes")
    r = kvtier("flush", "--url", url, "-n", pop.other)
    assert_usage_error(r, f"namespace {pop.other}", "--yes")
    r = invoke("flush", "--url", url)  # CliRunner's stdin is no terminal either
    assert r.code == 2
    with open_backend(url) as b:
        assert b.stats().entries == pop.entries  # nothing deleted

    r = kvtier("flush", "--url", url, "-n", pop.other, "--yes", "--json")
    assert r.code == 0, r.stderr
    assert r.json() == {"flushed": 21}  # its 20 blocks and its manifest
    assert [row["namespace"] for row in kvtier("ls", "--url", url, "--json").json()] == [pop.main]

    r = kvtier("flush", "--url", url, "-y", "--json")
    assert r.code == 0 and r.json() == {"flushed": len(pop.blocks(pop.main)) + 1}
    with open_backend(url) as b:
        assert b.stats().entries == 0
    assert kvtier("ls", "--url", url, "--json").json() == []


def _kvtier_on_a_terminal(args: list[str], answer: bytes) -> Run:
    """Run with stdin on a pseudo-terminal, typing ``answer``."""
    import pty

    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([KVTIER, *args], stdin=slave, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
        os.close(slave)
        os.write(master, answer)
        out, err = p.communicate(timeout=60)
    finally:
        os.close(master)
    return Run(p.returncode, out, err)


def test_flush_asks_on_a_terminal(fresh_tier) -> None:
    url, pop = fresh_tier
    no = _kvtier_on_a_terminal(["flush", "--url", url], b"n\n")
    assert no.code == 1 and "Flush ALL kvtier blocks" in no.stderr
    with open_backend(url) as b:
        assert b.stats().entries == pop.entries

    # the question goes to stderr, so --json output stays parseable
    yes = _kvtier_on_a_terminal(["flush", "--url", url, "-n", pop.other, "--json"], b"y\n")
    assert yes.code == 0, yes.stderr
    assert f"Flush namespace {pop.other}" in yes.stderr
    assert yes.json() == {"flushed": 21}


@pytest.mark.redis
def test_flush_redis_keeps_foreign_keys(redis_private) -> None:
    url, pop = _populated_redis(redis_private)
    admin = redis_private.client()
    admin.set("foreign:key", "keep me")
    admin.set("kvt1", "not under the kvt1: prefix")
    total = pop.entries + 2
    assert admin.dbsize() == total

    r = kvtier("flush", "--url", url)
    assert_usage_error(r, "--yes")
    assert admin.dbsize() == total

    r = kvtier("flush", "--url", url, "--namespace", pop.other, "--yes", "--json")
    assert r.code == 0, r.stderr
    assert r.json() == {"flushed": 21}
    assert admin.dbsize() == total - 21
    assert admin.exists(manifest_key(bytes.fromhex(pop.main)))

    human = kvtier("flush", "--url", url, "--yes")
    assert human.code == 0 and "flushed" in human.stdout
    assert sorted(admin.keys("*")) == [b"foreign:key", b"kvt1"]
    assert admin.get("foreign:key") == b"keep me"


# -- read-only commands on Redis Cluster --------------------------------------------------------
@pytest.mark.redis
def test_read_only_commands_on_redis_cluster(redis_cluster_target, token_files) -> None:
    """A shared cluster (other tests use it): a tenant of our own keeps our namespaces apart."""
    url = redis_cluster_target.url
    assert url.startswith("redis+cluster://")
    with open_backend(url) as b:
        pop = populate(b, tenant=uuid.uuid4().hex)
    try:
        rows = [r for r in kvtier("ls", "--url", url, "--json").json()
                if r["namespace"] in (pop.main, pop.other)]
        _check_ls(rows, pop)
        s = kvtier("stats", "--url", url, "--json").json()
        assert s["extra"]["mode"] == "cluster" and s["entries"] >= pop.entries
        info = kvtier("inspect", pop.key("full", 3, 4), "--url", url, "--json").json()
        assert info["valid"] is True and info["group"] == 3
        blocks = kvtier("ls", "--url", url, "-n", pop.other, "--limit", "100", "--json").json()
        assert len(blocks) == 20
        for scenario in ("evicted_parent", "layout_mismatch"):
            name, ns, *_ = _expected(pop)[scenario]
            r = invoke("explain", "--url", url, "-n", ns, "--token-file", str(token_files[name]),
                       "--json")
            assert r.code == 0, r.stderr
            _check_explain(json.loads(r.stdout), pop, scenario)
        h = kvtier("health", "--url", url, "--json").json()
        assert h["ok"] is True and h["mode"] == "cluster"
    finally:
        for ns in (pop.main, pop.other):
            kvtier("flush", "--url", url, "-n", ns, "--yes")


# -- bad input ------------------------------------------------------------------------------------
VALID_KEY = BlockKey(bytes(16), 0, 0, bytes(32)).encode().decode()  # well formed, never stored
BAD_INPUT = {
    "ns_not_hex": (["ls", "-n", "zz-not-hex"], ["--namespace must be hex"]),
    "ns_short": (["ls", "-n", "abcd"], ["32 hex digits"]),
    "ns_unknown_ls": (["ls", "-n", "f" * 32], ["not in this tier", "kvtier ls"]),
    "ns_unknown_evict": (["evict", "-n", "e" * 32], ["not in this tier"]),
    "ns_unknown_pin": (["pin", "-n", "e" * 32], ["not in this tier"]),
    "ns_unknown_explain": (["explain", "-n", "f" * 32, "--token-ids", "1,2,3"],
                           ["has no manifest", "kvtier ls"]),
    "ns_bad_flush": (["flush", "-n", "xyz", "--yes"], ["--namespace must be hex"]),
    "key_malformed": (["inspect", "kvt1:zz"], ["not a kvtier block key"]),
    "key_bad_hex": (["inspect", "kvt1:nothex:0:0:ab"], ["malformed kvtier block key"]),
    # brackets are text, not console markup (this used to crash with a traceback)
    "key_brackets": (["inspect", "kvt1:[/x]:0:0:ab"], ["kvt1:[/x]:0:0:ab"]),
    "ns_brackets": (["ls", "-n", "[bold]zz"], ["'[bold]zz'"]),
    "evict_bad_key": (["evict", "not-a-key"], ["not a kvtier block key"]),
    "pin_keys_and_ns": (["pin", VALID_KEY, "-n", "0" * 32], ["not both"]),
    "ns_short_key": (["inspect", "kvt1:00:0:0:00"], ["namespace must be 32 hex digits"]),
    "evict_nothing": (["evict"], ["give block keys or --namespace"]),
    "token_ids": (["explain", "--token-ids", "1,x"], ["--token-ids must be"]),
    "explain_no_prompt": (["explain"], ["exactly one of"]),
    "bench_unknown": (["bench", "nope"],
                      ["unknown benchmark", "admission, nixl, reliability or all"]),
    "serve_capacity": (["serve", "--port", "0", "--capacity", "lots"],
                       ["cannot parse size 'lots'", "4GiB"]),
    "serve_redis_without_url": (["serve", "--port", "0", "--backend", "redis"],
                                ["needs --redis-url"]),
}
BAD_URL = {
    "scheme": ("http://127.0.0.1:7070", ["no supported scheme", "grpc://"]),
    "no_scheme": ("127.0.0.1:7070", ["no supported scheme"]),
    "grpc_no_port": ("grpc://localhost", ["grpc://HOST:PORT"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input(case: str, tier) -> None:
    url, _ = tier
    args, needles = BAD_INPUT[case]
    if args[0] not in ("bench", "serve"):
        args = [*args, "--url", url]
    # an 80-column "terminal": the message must still be one line
    assert_usage_error(kvtier(*args, columns=80), *needles)


@pytest.mark.parametrize("args", [["ls", "-n", "0" * 32, "--limit", "0"], ["stats", "--bogus"],
                                  ["ls", "--limit", "x"], ["frobnicate"]])
def test_usage_errors(args: list[str]) -> None:
    """Option parsing errors are typer's: exit 2, usage text, no traceback."""
    r = kvtier(*args, "--url", "memory://", columns=80)
    assert r.code == 2 and "Usage: kvtier" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", sorted(BAD_URL))
@pytest.mark.parametrize("command", [["stats"], ["ls"], ["health"], ["inspect", VALID_KEY],
                                     ["flush", "--yes"], ["evict", VALID_KEY]])
def test_bad_url(case: str, command: list[str]) -> None:
    url, needles = BAD_URL[case]
    assert_usage_error(kvtier(*command, "--url", url, columns=80), *needles)


def test_bad_url_from_environment() -> None:
    p = subprocess.run([KVTIER, "stats"], capture_output=True, text=True, timeout=60,
                       env={**_env(80), "KVTIER_URL": "ftp://x"}, stdin=subprocess.DEVNULL)
    assert_usage_error(Run(p.returncode, p.stdout, p.stderr), "'ftp://x'", "grpc://")


# -- bench --------------------------------------------------------------------------------------
def test_bench_grpc() -> None:
    """What the bench did, not its own arithmetic: it moved the whole 128K-token hybrid
    prefix (its size follows from the bench's design: 341 attention pages and 3 states,
    each a payload), looked it all up, and reported rates that fit in the wall time
    this test measured (each of 4 contenders fetched the prefix 7 times; a median
    means at least 4 of them took that long or longer)."""
    t0 = time.monotonic()
    r = kvtier("bench", "grpc", "--json", timeout=600)
    wall_s = time.monotonic() - t0
    assert r.code == 0, r.stderr[-3000:]
    g = r.json()["grpc"]
    assert set(g) >= {"prefix_bytes", "blocks", "raw_socket_gbps", "tier_fetch_gbps", "ratio",
                      "grpc_streamed_gbps", "grpc_streamed_ratio", "ratio_goal",
                      "lookup_128k_16tok_ms", "lookup_128k_384tok_ms", "lookup_goal_ms"}
    assert g["blocks"] == 341 + 3
    assert g["prefix_bytes"] == 341 * (196_608 + payload.HEADER_SIZE) + \
        3 * (134_144 + payload.HEADER_SIZE)
    rates = [g[f] for f in ("raw_socket_gbps", "tier_fetch_gbps",
                            "tier_fetch_fresh_buffer_gbps", "grpc_streamed_gbps")]
    assert all(x > 0 for x in rates), g
    assert sum(4 * g["prefix_bytes"] / (x * 1e9) for x in rates) < wall_s, (wall_s, g)
    for f in ("lookup_128k_16tok_ms", "lookup_128k_384tok_ms"):
        assert 0 < g[f]["median"] <= g[f]["p99"] < wall_s * 1e3
        assert g[f]["boundary"] == 341  # the whole stored prefix is restorable

