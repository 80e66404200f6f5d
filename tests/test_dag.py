"""dynlab.dag: pipeline steps as plain Ray tasks, ordered with graphlib, cached under content hashes.

The step functions live at module level: Ray pickles them by reference, and their module and name
are part of the cache key. Each appends its name to the log file named in its config, so a test
sees which steps really ran.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynlab import dag
from dynlab.dag import Step
from dynlab.errors import DynlabError

ROOT = Path(__file__).resolve().parents[1]


# --- step functions ------------------------------------------------------------------------------


def _note(ctx) -> None:
    log = (ctx.config or {}).get("log") if isinstance(ctx.config, dict) else None
    if log:
        with open(log, "a") as f:
            f.write(ctx.name + "\n")


def source(ctx):
    _note(ctx)
    return {"n": ctx.config["n"], "tag": "src"}


def double(ctx, x):
    _note(ctx)
    return {"value": 2 * x}


def add(ctx, x):
    _note(ctx)
    return {"value": x + ctx.config["k"]}


def combine(ctx, left, right):
    _note(ctx)
    return {"total": left["value"] + right["value"], "parts": [left["value"], right["value"]]}


def flaky(ctx):
    """Fails its first ``fail_times`` attempts (counted in a file, across processes)."""
    with open(ctx.config["attempts"], "a") as f:
        f.write("x\n")
    count = len(Path(ctx.config["attempts"]).read_text().splitlines())
    (ctx.out_dir / "partial.txt").write_text("half-written")
    if count <= ctx.config["fail_times"]:
        raise ValueError(f"boom {count}")
    return {"ok": count}


def crashes_once(ctx):
    """Kills its worker process on the first attempt, after writing a file into its folder."""
    with open(ctx.config["attempts"], "a") as f:
        f.write("x\n")
    (ctx.out_dir / "partial.txt").write_text("half-written")
    if len(Path(ctx.config["attempts"]).read_text().splitlines()) == 1:
        os._exit(1)
    return {"survived": ctx.attempt}


def fills_the_disk(ctx):
    """Writes part of a file into its folder, then finds the disk full."""
    target = ctx.out_dir / "weights.bin"
    target.write_bytes(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))


def not_json(ctx):
    return {"model": object()}


def whoami(ctx):
    return {"pid": os.getpid()}


def write_files(ctx):
    _note(ctx)
    out = ctx.out_dir
    (out / "t.txt").write_text(ctx.config["text"])
    (out / "sub").mkdir()
    (out / "sub" / "u.txt").write_text("inner")
    return {"table": str(out / "t.txt"), "dir": str(out / "sub"), "all": str(out), "nested": {"list": [out / "sub" / "u.txt"]}, "outside": "/etc/hostname", "plain": "t.txt"}


def read_back(ctx, path):
    _note(ctx)
    return {"text": Path(path).read_text(), "path": path}


def rendezvous(ctx):
    """Announce itself, then wait until the partner step has announced too: only possible when
    both run at the same time (a deadline turns a serial schedule into a failure, not a hang)."""
    folder = Path(ctx.config["folder"])
    (folder / ctx.config["me"]).touch()
    deadline = time.time() + 120
    while not (folder / ctx.config["partner"]).exists():
        if time.time() > deadline:
            raise TimeoutError(f"{ctx.config['me']}: partner {ctx.config['partner']} never started")
        time.sleep(0.05)
    return {"pid": os.getpid()}


if __name__ != "tests.test_dag":
    # pytest imports this file as `test_dag`, a name Ray workers cannot import: use the same
    # functions from `tests.test_dag` (importable everywhere), which also keeps cache keys the same
    # in a subprocess that imports them from there.
    from tests.test_dag import add, combine, crashes_once, double, flaky, not_json, read_back, rendezvous, source, whoami, write_files  # noqa: F811


def diamond(tmp: Path, n: int = 3, note: str = "", k: int = 1) -> list[Step]:
    """a -> (b, c) -> d; every step notes itself in tmp/log.txt when it runs."""
    log = str(tmp / "log.txt")
    return [
        Step("a", source, {"n": n, "note": note, "log": log}),
        Step("b", double, {"log": log}, {"x": ("a", "n")}),
        Step("c", add, {"k": k, "log": log}, {"x": ("a", "n")}),
        Step("d", combine, {"log": log}, {"left": "b", "right": "c"}),
    ]


def ran_steps(tmp: Path) -> list[str]:
    log = tmp / "log.txt"
    return log.read_text().split() if log.exists() else []


def statuses(res) -> dict[str, str]:
    return {r.name: r.status for r in res.records}


class FakeTracker:
    """The part of dynlab.tracking.RunHandle that dag uses."""

    def __init__(self):
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def log_text(self, text, name):
        self.texts[name] = text

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})


# --- tests -----------------------------------------------------------------------------------------


def test_diamond_runs_in_order_and_results_flow(tmp_path, ray_local):
    lines: list[str] = []
    tracker = FakeTracker()
    res = dag.run(diamond(tmp_path), tmp_path / "cache", tracker=tracker, log=lines.append)
    assert statuses(res) == {"a": "ran", "b": "ran", "c": "ran", "d": "ran"}
    assert res.ok and res.ran == ["a", "b", "c", "d"] and res.cached == []
    assert res["a"] == {"n": 3, "tag": "src"}
    assert res["b"] == {"value": 6} and res["c"] == {"value": 4}
    assert res["d"] == {"total": 10, "parts": [6, 4]}
    order = ran_steps(tmp_path)
    assert order[0] == "a" and order[-1] == "d" and sorted(order[1:3]) == ["b", "c"]
    # the graph is printed before any step finishes, one line per step
    first_progress = next(i for i, line in enumerate(lines) if line.startswith("[dag] ran"))
    graph = "\n".join(lines[:first_progress])
    assert "d <- left=b, right=c" in graph and "b <- x=a[n]" in graph
    assert any(line.startswith("[dag] ran d in ") for line in lines)
    # cache layout: <cache>/<fn name>/<key>/result.json
    rec = res.record("d")
    assert Path(rec.path) == tmp_path / "cache" / "combine" / rec.key
    assert json.loads((Path(rec.path) / "result.json").read_text())["result"] == res["d"]
    assert rec.attempts == 1 and rec.seconds >= 0 and rec.error is None
    # tracking
    assert "d <- left=b, right=c" in tracker.texts["dag/graph.txt"]
    records = json.loads(tracker.texts["dag/steps.json"])
    assert [(r["name"], r["status"]) for r in records] == [("a", "ran"), ("b", "ran"), ("c", "ran"), ("d", "ran")]
    assert tracker.tags["dynlab.dag.ran"] == "4" and tracker.tags["dynlab.dag.cached"] == "0"


def test_unchanged_pipeline_is_all_cached_without_starting_ray(tmp_path, ray_local):
    first = dag.run(diamond(tmp_path), tmp_path / "cache", log=lambda s: None)
    assert len(ran_steps(tmp_path)) == 4

    lines: list[str] = []
    again = dag.run(diamond(tmp_path), tmp_path / "cache", log=lines.append)
    assert again.cached == ["a", "b", "c", "d"] and again.ran == []
    assert again.results == first.results
    assert [r.key for r in again.records] == [r.key for r in first.records]
    assert "[dag] cached d" in lines
    assert len(ran_steps(tmp_path)) == 4  # no step function was called again

    # in a fresh interpreter: all cached, so Ray is never imported, let alone initialised
    script = (
        "import json, sys, time\n"
        "t0 = time.perf_counter()\n"
        "from pathlib import Path\n"
        "from dynlab import dag\n"
        "from tests.test_dag import diamond\n"
        "tmp = Path(sys.argv[1])\n"
        "res = dag.run(diamond(tmp), tmp / 'cache', log=lambda s: None)\n"
        "ray_up = 'ray' in sys.modules and sys.modules['ray'].is_initialized()\n"
        "print(json.dumps({'cached': res.cached, 'ray_imported': 'ray' in sys.modules, 'ray_up': ray_up, 's': time.perf_counter() - t0}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["cached"] == ["a", "b", "c", "d"]
    assert report["ray_imported"] is False and report["ray_up"] is False
    assert report["s"] < 10
    assert len(ran_steps(tmp_path)) == 4


def test_changed_config_reruns_the_step_and_what_its_new_content_reaches(tmp_path, ray_local):
    cache = tmp_path / "cache"
    dag.run(diamond(tmp_path), cache, log=lambda s: None)

    # c's config changes its result: c and d run again, a and b stay cached
    res = dag.run(diamond(tmp_path, k=2), cache, log=lambda s: None)
    assert statuses(res) == {"a": "cached", "b": "cached", "c": "ran", "d": "ran"}
    assert res["d"] == {"total": 11, "parts": [6, 5]}

    # a's config changes but not its result: a runs, everything downstream stays cached
    before = len(ran_steps(tmp_path))
    res = dag.run(diamond(tmp_path, k=2, note="same output"), cache, log=lambda s: None)
    assert statuses(res) == {"a": "ran", "b": "cached", "c": "cached", "d": "cached"}
    assert ran_steps(tmp_path)[before:] == ["a"]

    # a version bump invalidates that step alone (its result is the same again)
    steps = diamond(tmp_path, k=2)
    steps[1].version = "2"
    res = dag.run(steps, cache, log=lambda s: None)
    assert statuses(res) == {"a": "cached", "b": "ran", "c": "cached", "d": "cached"}


def test_failing_step_is_retried_recorded_and_its_downstream_skipped(tmp_path, ray_local):
    cache = tmp_path / "cache"
    f = {n: str(tmp_path / f"{n}.attempts") for n in ("bad", "recovers", "bad_driver")}
    steps = [
        Step("bad", flaky, {"attempts": f["bad"], "fail_times": 99}, retries=2),
        Step("after_bad", double, inputs={"x": ("bad", "ok")}),
        Step("after_after", double, inputs={"x": ("after_bad", "value")}),
        Step("sibling", source, {"n": 1}),
        Step("recovers", flaky, {"attempts": f["recovers"], "fail_times": 1}, retries=1),
        Step("bad_driver", flaky, {"attempts": f["bad_driver"], "fail_times": 99}, where="driver", retries=1),
        Step("weird", not_json, retries=2),
    ]
    lines: list[str] = []
    res = dag.run(steps, cache, log=lines.append)  # does not raise
    assert statuses(res) == {
        "bad": "failed", "after_bad": "skipped", "after_after": "skipped", "sibling": "ran",
        "recovers": "ran", "bad_driver": "failed", "weird": "failed",
    }  # fmt: skip
    bad = res.record("bad")
    assert bad.attempts == 3 and len(Path(f["bad"]).read_text().splitlines()) == 3
    assert bad.error == "ValueError: boom 3" and "boom 3" in bad.traceback
    assert res.record("after_bad").error == "upstream bad failed"
    assert res.record("after_after").error == "upstream bad failed"
    assert res.record("recovers").attempts == 2 and res["recovers"] == {"ok": 2}
    driver = res.record("bad_driver")
    assert driver.attempts == 2 and driver.error == "ValueError: boom 2"
    weird = res.record("weird")  # not retried: running it again cannot help
    assert weird.attempts == 1 and "step 'weird'" in weird.error and "result['model']" in weird.error
    assert res["sibling"] == {"n": 1, "tag": "src"}
    assert set(res.results) == {"sibling", "recovers"}
    assert any(line.startswith("[dag] FAILED bad after 3 attempt(s): ValueError: boom 3") for line in lines)

    # nothing of a failed step is in the cache, nor left in the temp folder
    failed_keys = [res.record(n).key for n in ("bad", "bad_driver", "weird")]
    assert all(failed_keys)
    leftovers = [p for p in cache.rglob("*") if any(k in p.name for k in failed_keys)]
    assert leftovers == []
    assert sorted(p.parent.name for p in cache.rglob("result.json")) == sorted([res.record("sibling").key, res.record("recovers").key])

    with pytest.raises(dag.StepFailed, match=r"bad \(after 3 attempt\(s\)\): ValueError: boom 3") as info:
        res.raise_for_failures()
    assert "after_bad" in str(info.value) and "bad_driver" in str(info.value)

    # a new run tries the failed step again (nothing cached) and loads the rest
    again = dag.run(steps[:4], cache, log=lambda s: None)
    assert statuses(again) == {"bad": "failed", "after_bad": "skipped", "after_after": "skipped", "sibling": "cached"}
    assert len(Path(f["bad"]).read_text().splitlines()) == 6


def test_a_crashed_worker_is_retried_and_its_temp_folder_removed(tmp_path, ray_local):
    cache = tmp_path / "cache"
    res = dag.run([Step("c", crashes_once, {"attempts": str(tmp_path / "c.attempts")}, retries=1)], cache, log=lambda s: None)
    rec = res.record("c")
    assert rec.status == "ran" and rec.attempts == 2 and res["c"] == {"survived": 2}
    assert list((cache / ".tmp").iterdir()) == []  # the first attempt's folder and the attempt counter are gone
    assert (Path(rec.path) / "partial.txt").exists()


def test_crashed_or_temporary_folder_is_never_taken_for_a_result(tmp_path, ray_local):
    cache = tmp_path / "cache"
    steps = [Step("a", source, {"n": 5, "log": str(tmp_path / "log.txt")}, where="driver")]
    first = dag.run(steps, cache, log=lambda s: None)
    rec = first.record("a")
    folder = Path(rec.path)
    stored = (folder / "result.json").read_text()

    # a crash after the step wrote its files but before result.json: the folder has no result.json
    (folder / "result.json").unlink()
    (folder / "result.json.part").write_text(stored[: len(stored) // 2])
    # and a leftover temp folder of the same key that even holds a complete result.json
    leftover = cache / ".tmp" / f"{rec.key}-deadbeef"
    leftover.mkdir()
    (leftover / "result.json").write_text(stored)

    res = dag.run(steps, cache, log=lambda s: None)
    assert statuses(res) == {"a": "ran"} and ran_steps(tmp_path) == ["a", "a"]
    assert json.loads((folder / "result.json").read_text())["result"] == {"n": 5, "tag": "src"}
    assert not (folder / "result.json.part").exists()  # the incomplete folder was replaced whole

    # a result.json of another key (copied by hand, say) is not trusted either
    doc = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**doc, "key": "0" * 64}))
    assert dag.run(steps, cache, log=lambda s: None).ran == ["a"]
    assert dag.run(steps, cache, log=lambda s: None).cached == ["a"]


def test_malformed_pipelines_are_rejected_before_anything_runs(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        dag.run([Step("a", double, inputs={"x": "b"}), Step("b", double, inputs={"x": "a"})], cache)
    with pytest.raises(ValueError, match=r"step 'b': input 'x' refers to unknown step 'zz'"):
        dag.run([Step("a", source, {"n": 1}), Step("b", double, inputs={"x": "zz"})], cache)
    with pytest.raises(ValueError, match=r"duplicate step name 'a'"):
        dag.run([Step("a", source, {"n": 1}), Step("a", source, {"n": 2})], cache)
    with pytest.raises(ValueError, match=r"step 'a': input 'x' refers to the step itself"):
        dag.run([Step("a", double, inputs={"x": "a"})], cache)
    with pytest.raises(ValueError, match=r"step 'a': where = 'gpu'"):
        dag.run([Step("a", source, {"n": 1}, where="gpu")], cache)
    with pytest.raises(ValueError, match=r"step 'a': fn .* must be a module-level function"):
        dag.run([Step("a", lambda ctx: {})], cache)
    with pytest.raises(ValueError, match=r"step 'a': config\['when'\] is a builtins.object"):
        dag.run([Step("a", source, {"when": object()})], cache)
    with pytest.raises(ValueError, match=r"step 'a': retries = -1"):
        dag.run([Step("a", source, {"n": 1}, retries=-1)], cache)
    assert ran_steps(tmp_path) == [] and not (cache / "source").exists()


def test_input_key_that_the_upstream_result_lacks_fails_that_step(tmp_path):
    steps = [Step("a", source, {"n": 1}, where="driver"), Step("b", double, inputs={"x": ("a", "missing")}, where="driver")]
    res = dag.run(steps, tmp_path / "cache", log=lambda s: None)
    assert statuses(res) == {"a": "ran", "b": "failed"}
    assert "input 'x' selects key 'missing' of step 'a'" in res.record("b").error


def test_driver_steps_run_in_process_and_tasks_do_not(tmp_path, ray_local):
    steps = [Step("here", whoami, where="driver", cache=False), Step("there", whoami, cache=False)]
    res = dag.run(steps, tmp_path / "cache", log=lambda s: None)
    assert res["here"]["pid"] == os.getpid()
    assert res["there"]["pid"] != os.getpid()
    # cache=False: runs every time, even though its key is unchanged
    again = dag.run(steps, tmp_path / "cache", log=lambda s: None)
    assert again.ran == ["here", "there"]
    assert again.record("here").key == res.record("here").key


def test_paths_come_back_absolute_inside_the_cache_folder(tmp_path, ray_local):
    cache = tmp_path / "cache"
    log = str(tmp_path / "log.txt")

    def steps(text="hello", note=0):
        return [
            Step("w", write_files, {"text": text, "note": note, "log": log}),
            Step("r", read_back, {"log": log}, {"path": ("w", "table")}),
        ]

    res = dag.run(steps(), cache, log=lambda s: None)
    folder = Path(res.record("w").path)
    assert folder.parent == cache / "write_files"
    w = res["w"]
    assert w["table"] == str(folder / "t.txt") and Path(w["table"]).read_text() == "hello"
    assert w["dir"] == str(folder / "sub") and w["all"] == str(folder)
    assert w["nested"]["list"] == [str(folder / "sub" / "u.txt")]
    assert w["outside"] == "/etc/hostname" and w["plain"] == "t.txt"  # not inside out_dir: left alone
    assert res["r"] == {"text": "hello", "path": str(folder / "t.txt")}  # the Ray task read the cached file
    stored = json.loads((folder / "result.json").read_text())["result"]
    assert stored["table"] == "t.txt" and stored["all"] == "." and stored["nested"]["list"] == ["sub/u.txt"]

    again = dag.run(steps(), cache, log=lambda s: None)
    assert again.cached == ["w", "r"] and again.results == res.results

    # the writer re-runs (new key, new folder) but writes the same bytes: the reader stays cached
    res2 = dag.run(steps(note=1), cache, log=lambda s: None)
    assert statuses(res2) == {"w": "ran", "r": "cached"} and res2["w"]["table"] != w["table"]
    # different bytes: the reader runs again
    assert statuses(dag.run(steps(text="bye"), cache, log=lambda s: None)) == {"w": "ran", "r": "ran"}

    # the cache can move: stored paths are relative
    moved = tmp_path / "moved"
    shutil.move(str(cache), moved)
    res3 = dag.run(steps(), moved, log=lambda s: None)
    assert res3.cached == ["w", "r"]
    assert res3["w"]["table"] == str(moved / "write_files" / res.record("w").key / "t.txt")
    assert Path(res3["w"]["table"]).read_text() == "hello"


def test_same_work_under_another_name_is_shared(tmp_path, ray_local):
    log = str(tmp_path / "log.txt")
    res = dag.run([Step("one", source, {"n": 7, "log": log}), Step("two", source, {"n": 7, "log": log})], tmp_path / "cache", log=lambda s: None)
    assert sorted(r.status for r in res.records) == ["cached", "ran"]
    assert res["one"] == res["two"] == {"n": 7, "tag": "src"}
    assert len(ran_steps(tmp_path)) == 1
    renamed = dag.run([Step("renamed", source, {"n": 7, "log": log})], tmp_path / "cache", log=lambda s: None)
    assert renamed.cached == ["renamed"] and len(ran_steps(tmp_path)) == 1


def test_independent_steps_run_concurrently(tmp_path, ray_local):
    folder = str(tmp_path)
    steps = [
        Step("s1", rendezvous, {"folder": folder, "me": "a", "partner": "b"}, retries=0),
        Step("s2", rendezvous, {"folder": folder, "me": "b", "partner": "a"}, retries=0),
    ]
    res = dag.run(steps, tmp_path / "cache", log=lambda s: None)
    assert res.ok, [r.error for r in res.records]  # each waited for the other: they ran together
    assert res["s1"]["pid"] != res["s2"]["pid"]


# --- a full disk or an unwritable cache (fault 5): a clear error naming the path, no cache entry ----


def cache_entries(cache: Path) -> list[Path]:
    """What a later run could read: result files outside the temp folder, and leftovers inside it."""
    results = [p for p in cache.rglob("result.json") if ".tmp" not in p.parts]
    return results + (list((cache / ".tmp").iterdir()) if (cache / ".tmp").exists() else [])


def test_an_unwritable_cache_fails_before_any_step_and_names_the_path(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should go")
    steps = [Step("a", source, {"n": 1, "log": str(tmp_path / "log.txt")}, where="driver")]
    with pytest.raises(dag.CacheError, match=r"cannot create the step cache folder .*not-a-folder/cache/\.tmp") as err:
        dag.run(steps, blocker / "cache", log=lambda s: None)
    assert isinstance(err.value, DynlabError) and ran_steps(tmp_path) == []
    print("[faults] unwritable step cache: refused before any step, steps run 0, cache entries 0")


def make_unwritable_folder(path: Path) -> None:
    """``path`` becomes a folder that refuses new files to every user, root included (CI runs as
    root, and root writes into a chmod-0o555 folder): a link to /sys, whose file system creates no
    regular files (EACCES; EROFS where it is mounted read-only, as in containers). Without /sys (not
    Linux): a folder without write permission, which refuses every user but root."""
    if Path("/sys").is_dir():
        path.symlink_to("/sys")
    else:
        path.mkdir()
        path.chmod(0o555)


def test_a_read_only_cache_fails_before_any_step_and_names_the_path(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_unwritable_folder(cache / ".tmp")  # the cache's folders exist; writing into them fails
    steps = [Step("a", source, {"n": 1, "log": str(tmp_path / "log.txt")}, where="driver")]
    with pytest.raises(dag.CacheError, match=rf"cannot write into the step cache folder {re.escape(str(cache / '.tmp'))}: (Permission denied|Read-only file system) ") as err:
        dag.run(steps, cache, log=lambda s: None)
    assert isinstance(err.value, DynlabError) and ran_steps(tmp_path) == []
    print("[faults] read-only step cache: refused before any step, steps run 0")


def test_a_full_disk_while_writing_the_result_leaves_no_cache_entry(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    steps = [Step("a", source, {"n": 4, "log": str(tmp_path / "log.txt")}, where="driver", retries=2)]
    real_write = Path.write_text

    def disk_full_at_result(self, data, *args, **kwargs):
        if self.name == "result.json.part":  # the runner's write of the result: half of it lands
            real_write(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_at_result)
    res = dag.run(steps, cache, log=lambda s: None)
    rec = res.record("a")
    assert rec.status == "failed" and rec.attempts == 1  # not retried: a full disk stays full
    assert "No space left on device" in rec.error and str(cache / ".tmp") in rec.error and "result.json" in rec.error
    assert cache_entries(cache) == []

    monkeypatch.setattr(Path, "write_text", real_write)  # space freed: the same command works
    assert dag.run(steps, cache, log=lambda s: None).ran == ["a"]
    assert dag.run(steps, cache, log=lambda s: None).cached == ["a"]
    print("[faults] full disk while writing a step result: 1 injected write failure, half-written cache entries 0, re-run ran then cached")


def test_a_failed_commit_leaves_no_cache_entry(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    steps = [Step("a", source, {"n": 5}, where="driver")]
    real_rename = os.rename

    def read_only_target(src, dst):
        if ".tmp" not in Path(dst).parts:  # moving the finished folder into place
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", read_only_target)
    rec = dag.run(steps, cache, log=lambda s: None).record("a")
    assert rec.status == "failed" and "Read-only file system" in rec.error and f"{cache}/source/{rec.key}" in rec.error
    assert cache_entries(cache) == [] and not (cache / "source" / rec.key).exists()
    print("[faults] read-only cache at commit: 1 injected write failure, cache entries 0")


def test_a_full_disk_while_the_step_writes_its_files_leaves_no_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    res = dag.run([Step("w", fills_the_disk, where="driver", retries=2)], cache, log=lambda s: None)
    rec = res.record("w")
    assert rec.status == "failed" and rec.attempts == 1
    assert "No space left on device" in rec.error and str(cache / ".tmp") in rec.error
    assert cache_entries(cache) == []
    print("[faults] full disk while a step writes its files: 1 injected write failure, cache entries 0")
