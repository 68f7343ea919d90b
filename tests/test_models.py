"""`phi3 models` on a store holding real converted variants: list, sizes as du counts them, rm, path, prune."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi3cli.backends import get_backend, registry
from phi3cli.backends.base import ConvertRecipe
from phi3cli.convert import ensure_variant, variant_key
from phi3cli.inventory import StoreInventory
from phi3cli.store import MANIFEST, ModelStore
from phi3cli.util import dir_size
from tests.conftest import run_phi3
from tests.test_sessions import Terminal

CONVERTERS = [
    name
    for name in ("onnx", "openvino")
    if registry()[name].installed and importlib.util.find_spec(registry()[name].factory.partition(":")[0])
]


@pytest.fixture(scope="module")
def real_variants(demo_source, store) -> dict[str, Path]:
    """The demo model converted to int4 by each installed converter, in the shared test store (built once)."""
    if not CONVERTERS:
        pytest.skip("no converting backend installed")
    recipe = ConvertRecipe(format="int4")
    return {name: ensure_variant(get_backend(name), demo_source, recipe, store) for name in CONVERTERS}


def _link_or_copy(src, dst):
    # Weights are hard-linked (no copy cost); small files are copied, so tests may rewrite them freely.
    if os.path.getsize(src) > 1 << 20:
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def tmp_store(tmp_path, real_variants, store) -> ModelStore:
    """A store of its own holding the real variants and the demo source, so tests may remove things."""
    root = tmp_path / "home"
    for path in real_variants.values():
        shutil.copytree(path, root / "variants" / "demo" / path.name, copy_function=_link_or_copy)
    shutil.copytree(store.source_dir("demo"), root / "sources" / "demo", copy_function=_link_or_copy)
    return ModelStore(root)


def models(store: ModelStore, *args: str, input: str | None = None):
    env = {"PHI3_HOME": str(store.root), "COLUMNS": "200"}  # a wide table: no wrapped words to match
    return run_phi3("models", *args, input=input, env=env, timeout=300)


def listing(store: ModelStore) -> dict:
    done = models(store, "list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def du(path: Path) -> int:
    """Bytes allocated on disk, as du counts them."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = path / MANIFEST
    data = {**json.loads(manifest.read_text()), **changes}
    manifest.unlink()  # never write through a hard link into the shared store
    manifest.write_text(json.dumps(data))


@pytest.mark.slow
def test_list_shows_every_variant_with_sizes_as_du_counts(tmp_store, real_variants):
    data = listing(tmp_store)
    variants = {e["backend"]: e for e in data["entries"] if e["kind"] == "variant"}
    assert set(variants) == set(real_variants)
    for name, entry in variants.items():
        assert (entry["source"], entry["source_spec"], entry["format"], entry["target"]) == (
            "demo",
            "demo",
            "int4",
            "cpu",
        )
        assert entry["status"] == "ok" and entry["outdated"] == {}
        assert entry["versions"] and all(entry["versions"].values())  # the runtime versions it was built with
        assert entry["converter"]  # part of the key
        assert entry["created"] <= entry["last_used"]
        assert entry["size_bytes"] == du(Path(entry["path"])) > 10_000_000
        assert Path(entry["path"]).name == real_variants[name].name
    (source,) = [e for e in data["entries"] if e["kind"] == "source"]
    assert source["source"] == "demo" and source["size_bytes"] == du(tmp_store.source_dir("demo"))
    assert data["total_bytes"] == du(tmp_store.root) == StoreInventory(tmp_store).total_size()

    table = models(tmp_store, "list")
    assert table.returncode == 0, table.stderr
    for entry in data["entries"]:
        assert entry["id"] in table.stdout
    assert "Store total" in table.stdout and f"({data['total_bytes']} bytes" in table.stdout


def test_dir_size_counts_like_du_and_each_link_once(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "sparse").write_bytes(b"")
    with open(folder / "sparse", "r+b") as fh:
        fh.truncate(50_000_000)  # apparent 50 MB, nothing allocated
    (folder / "data").write_bytes(os.urandom(300_001))
    os.link(folder / "data", folder / "link")
    assert dir_size(folder) == du(folder) < 1_000_000


def wait_for(predicate, timeout: float = 300, what: str = ""):
    end = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_a_killed_convert_is_never_listed_as_a_variant(tmp_store):
    """SIGKILL part way through a real conversion into the store: the staging folder is half-built, then stale."""
    if "onnx" not in CONVERTERS:
        pytest.skip("needs the onnx backend")
    group = tmp_store.variants_dir / "demo"
    before = {p.name for p in group.iterdir()}
    env = {**os.environ, "PHI3_HOME": str(tmp_store.root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3cli", "convert", "demo", "--to", "onnx", "--format", "fp16"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        staging = wait_for(lambda: [p for p in group.iterdir() if ".partial-" in p.name], what="the staging folder")[0]
        assert staging.name.startswith(".onnx-fp16-cpu-") and staging.name.endswith(f".partial-{proc.pid}")
        during = listing(tmp_store)
        (building,) = [e for e in during["entries"] if e["kind"] == "partial" and e["path"] == str(staging)]
        assert building["status"] == f"building (process {proc.pid})"
        refused = models(tmp_store, "rm", building["id"], "--yes")
        assert refused.returncode == 1 and "being built" in refused.stderr
        time.sleep(2)  # let the builder write part of the graph
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert staging.exists()  # what a killed process leaves behind

    data = listing(tmp_store)
    assert sorted(e["backend"] for e in data["entries"] if e["kind"] == "variant") == sorted(CONVERTERS)
    assert {p.name for p in group.iterdir()} - before == {staging.name}
    stale = [e for e in data["entries"] if e["kind"] == "partial"]
    assert str(staging) in [e["path"] for e in stale]
    assert all(e["status"] == f"stale: left by process {proc.pid}, which is gone" for e in stale)
    assert all(v.key.format == "int4" for v in StoreInventory(tmp_store).variants())

    pruned = models(tmp_store, "prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert not staging.exists()
    assert not [e for e in listing(tmp_store)["entries"] if e["kind"] == "partial"]
    assert {p.name for p in group.iterdir()} == before


@pytest.mark.slow
def test_broken_and_foreign_entries_are_listed_removable_and_never_loaded(tmp_store, real_variants, demo_source):
    name = CONVERTERS[0]
    group = tmp_store.variants_dir / "demo"
    corrupt = group / real_variants[name].name
    (corrupt / MANIFEST).unlink()
    (corrupt / MANIFEST).write_text("{ this is not json")
    foreign = group / "somebody-elses-folder"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    (tmp_store.variants_dir / "stray-file.bin").write_bytes(b"x" * 10)

    data = listing(tmp_store)
    broken = {Path(e["path"]).name: e for e in data["entries"] if e["kind"] == "broken"}
    assert broken[corrupt.name]["status"] == "broken: variant.json unreadable or not ours"
    assert broken["somebody-elses-folder"]["status"] == "broken: no variant.json"
    assert broken["stray-file.bin"]["status"] == "broken: not a folder"
    assert corrupt.name not in [v.path.name for v in StoreInventory(tmp_store).variants()]
    key = variant_key(get_backend(name), demo_source, ConvertRecipe(format="int4"))
    assert tmp_store.variant_dir(key) == corrupt and tmp_store.find_variant(key) is None  # never loaded

    removed = models(tmp_store, "rm", broken[corrupt.name]["id"], broken["somebody-elses-folder"]["id"], "--yes")
    assert removed.returncode == 0, removed.stderr
    assert not corrupt.exists() and not foreign.exists()
    assert "Freed" in removed.stdout


@pytest.mark.slow
def test_a_variant_missing_its_model_file_is_broken(tmp_store, real_variants):
    name = CONVERTERS[0]
    marker = registry()[name].marker
    path = tmp_store.variants_dir / "demo" / real_variants[name].name
    (path / marker).unlink()
    (entry,) = [e for e in listing(tmp_store)["entries"] if e["path"] == str(path)]
    assert entry["kind"] == "broken" and entry["status"] == f"broken: {marker} is missing"
    assert StoreInventory(tmp_store).variants() == [v for v in StoreInventory(tmp_store).variants() if v.path != path]


@pytest.mark.slow
def test_rm_by_id_path_and_source(tmp_store, real_variants):
    data = listing(tmp_store)
    variants = [e for e in data["entries"] if e["kind"] == "variant"]

    # No terminal to confirm on and no --yes: nothing is removed.
    asked = models(tmp_store, "rm", variants[0]["id"])
    assert asked.returncode == 1 and "Pass --yes" in asked.stderr
    assert Path(variants[0]["path"]).exists()

    by_prefix = models(tmp_store, "rm", variants[0]["id"][:5], "--yes")
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert not Path(variants[0]["path"]).exists()
    if len(variants) > 1:
        rel = Path(variants[1]["path"]).relative_to(tmp_store.root)
        by_path = models(tmp_store, "rm", str(rel), "--yes")  # a path as the store shows it
        assert by_path.returncode == 0, by_path.stderr
        assert not Path(variants[1]["path"]).exists()

    for bad, needle in [
        ("nothing-like-this", "Nothing in the model store matches 'nothing-like-this'"),
        (variants[0]["id"], "Nothing in the model store matches"),  # already gone
        ("/etc", "is not in the model store"),
    ]:
        done = models(tmp_store, "rm", bad, "--yes")
        assert done.returncode == 1 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (tmp_store.source_dir("demo") / "config.json").exists()


@pytest.mark.slow
def test_rm_a_source_removes_all_its_variants_and_keeps_the_source(tmp_store, real_variants):
    done = models(tmp_store, "rm", "demo", "--yes")
    assert done.returncode == 0, done.stderr
    assert "Kept the source model demo" in done.stdout
    assert StoreInventory(tmp_store).variants() == [] and not (tmp_store.variants_dir / "demo").exists()
    assert [e.kind for e in StoreInventory(tmp_store).entries()] == ["source"]


@pytest.mark.slow
def test_rm_asks_on_a_terminal(tmp_store, real_variants, tmp_path):
    entry = listing(tmp_store)["entries"][0]
    term = Terminal("models", "rm", entry["id"], cwd=tmp_path, env={"PHI3_HOME": str(tmp_store.root)})
    term.expect(r"Remove 1 entry \([\d.]+ \w+\)\? \[y/N\]")
    term.type("n")
    term.expect("Nothing removed")
    assert term.close() == 1
    assert Path(entry["path"]).exists()


@pytest.mark.slow
def test_path(tmp_store, real_variants):
    assert models(tmp_store, "path").stdout.strip() == str(tmp_store.root)
    entry = listing(tmp_store)["entries"][0]
    assert models(tmp_store, "path", entry["id"]).stdout.strip() == entry["path"]


@pytest.mark.slow
def test_prune_removes_outdated_and_unused_variants(tmp_store, real_variants):
    if len(real_variants) < 2:
        pytest.skip("needs two converted variants")
    old_build, unused = (tmp_store.variants_dir / "demo" / p.name for p in real_variants.values())
    versions = json.loads((old_build / MANIFEST).read_text())["versions"]
    first = next(iter(versions))
    rewrite_manifest(old_build, versions={**versions, first: "0.0.1"})
    rewrite_manifest(unused, last_used=time.time() - 40 * 86400)

    dry = models(tmp_store, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{first} 0.0.1" in dry.stdout and "nothing removed" in dry.stdout
    assert old_build.exists() and "unused" not in dry.stdout  # 40 days unused counts only with --older-than

    pruned = models(tmp_store, "prune", "--older-than", "30", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert "unused for 40 days" in pruned.stdout
    assert not old_build.exists() and not unused.exists()
    assert models(tmp_store, "prune").stdout.strip() == "Nothing to prune."


@pytest.mark.slow
def test_converter_version_is_part_of_the_key(tmp_store, real_variants, demo_source, monkeypatch):
    """An upgraded converter builds a new variant instead of reusing one built by the old release."""
    name = CONVERTERS[0]
    backend = get_backend(name)
    recipe = ConvertRecipe(format="int4")
    old_key = variant_key(backend, demo_source, recipe)
    assert tmp_store.find_variant(old_key) is not None
    monkeypatch.setattr(type(backend), "converter_version", lambda self: "a future release 99.0")
    new_key = variant_key(backend, demo_source, recipe)
    assert (new_key.source, new_key.backend, new_key.format, new_key.target) == (
        old_key.source,
        old_key.backend,
        old_key.format,
        old_key.target,
    )
    assert new_key.dirname != old_key.dirname
    assert tmp_store.find_variant(new_key) is None

    path = ensure_variant(backend, demo_source, recipe, tmp_store)
    assert path == tmp_store.variant_dir(new_key) != tmp_store.variant_dir(old_key)
    assert {v.key.converter for v in StoreInventory(tmp_store).variants() if v.key.backend == name} == {
        old_key.converter,
        "a future release 99.0",
    }


def test_empty_store(tmp_path):
    done = run_phi3("models", "list", env={"PHI3_HOME": str(tmp_path / "none")})
    assert done.returncode == 0 and "is empty" in done.stdout
