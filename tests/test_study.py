"""The study: every shipped plan validates at load; a tiny study runs end to end from the
CLI, prints the claims table, writes claims.json and a report that opens with it; a
second call does nothing new; a study killed mid-sweep completes on the next call with
every run's records exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from escapelab.claims import CLAIMS, VERDICTS
from escapelab.errors import ConfigError
from escapelab.store import read_jsonl
from escapelab.study import (
    PARTS,
    load_plan,
    representatives,
    study_scale_names,
    sweep_spec,
)
from escapelab.sweep import expand

TINY = {
    "name": "tiny", "base": "digits",
    "overrides": {"data.name": "synthetic", "data.synthetic.n_train": 240,
                  "data.synthetic.n_test": 120, "data.batch_size": 32,
                  "model.widths": [8, 16], "model.d_out": 64, "train.steps": 60,
                  "probe.log_until": 10, "probe.log_points": 5, "probe.every": 20,
                  "checkpoint.every": 0, "init.sigma_eps": 1e-6,
                  "sharpness.enabled": False},
    "seeds": [0, 1], "representative_lr": 3e4,
    "parts": {
        "lr-range": {"options": {"steps": 60, "seeds": [0, 1]}},
        "step-size": {"grid": {"optim.lr": [1e2, 1e4, 3e4]}},
        "batch-size": {"overrides": {"optim.lr": 1e4},
                       "grid": {"data.batch_size": [32, "full"]}},
        "loss-warmup": {"overrides": {"optim.lr": 1e4},
                        "grid": {"loss.name": ["mse", "nmse"], "schedule": [
                            {"label": "constant", "schedule.name": "constant"},
                            {"label": "warmup-20", "schedule.name": "linear_warmup",
                             "schedule.warmup_steps": 20}]},
                        "seeds": [0]},
        "analyze": {"options": {"samples": 100, "probe_samples": 100}},
        "finetune": {"options": {"seeds": [0], "epochs": 1}},
    },
}


def write_plan(folder: Path, **changes) -> Path:
    plan = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        plan["parts"][key.replace("_", "-")] = value
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "escapelab", *map(str, args)],
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("scale", study_scale_names())
def test_every_shipped_scale_validates(scale):
    plan = load_plan(scale)
    assert plan.name == scale
    for part in ("step-size", "batch-size", "loss-warmup"):
        points = expand(sweep_spec(plan, part))
        assert len({p.dirname for p in points}) == len(points)
        assert {p.config.seed for p in points} >= {0}
    reps = representatives(plan)
    assert [p.config.seed for p in reps] == plan.seeds  # one representative run per seed
    assert "full" in plan.parts.batch_size.grid["data.batch_size"]


def test_the_shipped_scales():
    assert set(study_scale_names()) == {"digits", "fashion-mnist", "fashion-mnist-vgg11",
                                         "cifar10-vgg11"}
    fmnist = load_plan("fashion-mnist")
    # full-batch GD on a documented stratified subset instead of dropping the claim
    assert fmnist.parts.batch_size.overrides["data.subset"] == 1024
    vgg = expand(sweep_spec(load_plan("fashion-mnist-vgg11"), "step-size"))[0].config
    assert vgg.model.name == "vgg11" and vgg.data.pad == 2 and vgg.data.name == "fashion-mnist"


@pytest.mark.parametrize("change, message", [
    ({"lr_range": {"options": {"steps": 1, "seeds": [0]}}}, "lr-range options: steps"),
    ({"step_size": {"grid": {"optim.lr": [1e2], "seed": [0]}}}, "seeds"),
    ({"step_size": {"grid": {"optim.lr": [1e2, 1e3]}}}, "representative_lr 30000"),
    ({"batch_size": {"grid": {"optim.lr": [1e2]}}}, "must vary data.batch_size"),
    ({"analyze": {"options": {"samplez": 3}}}, "analyze options: samplez"),
    ({"loss_warmup": {"grid": {"loss.name": ["bogus"]}}}, "loss.name"),
    ({"batch_size": {"overrides": {"data.subset": 100, "probe.train_samples": 200},
                     "grid": {"data.batch_size": [32]}}}, "exceeds data.subset=100"),
])
def test_bad_plans_are_one_line(tmp_path, change, message):
    path = write_plan(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        load_plan(path)
    result = cli("study", "--scale", path, "--out", tmp_path / "out", check=False)
    assert result.returncode == 2 and message.split()[0] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_unknown_scale_and_folder_checks(tmp_path):
    result = cli("study", "--scale", "bogus", check=False)
    assert result.returncode == 2 and "unknown study scale 'bogus'" in result.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = cli("study", "--scale", write_plan(tmp_path), "--out", tmp_path / "mine",
                 "--parts", "lr-range", check=False)
    assert result.returncode == 2 and "holds no study" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_an_edited_plan_reuses_its_runs_another_scale_is_refused(tmp_path):
    path = write_plan(tmp_path)
    out = tmp_path / "out"
    cli("study", "--scale", path, "--out", out, "--parts", "lr-range")
    runs = sorted(p.name for p in (out / "lr-range" / "runs").iterdir())
    before = {p: p.stat().st_mtime_ns for p in out.glob("lr-range/runs/*/summary.json")}
    plan = yaml.safe_load(path.read_text())
    plan["parts"]["analyze"]["options"]["samples"] = 50  # the lr-range runs are unchanged
    path.write_text(yaml.safe_dump(plan))
    again = cli("study", "--scale", path, "--out", out, "--parts", "lr-range")
    assert "other parts not done: step-size (not run)" in again.stdout
    assert "lr-range" not in again.stdout.split("other parts not done")[1]
    assert sorted(p.name for p in (out / "lr-range" / "runs").iterdir()) == runs
    assert {p: p.stat().st_mtime_ns for p in before} == before  # reused, not retrained
    assert json.loads((out / "study.json").read_text())["plan"]["parts"]["analyze"] == \
        {"options": {"samples": 50, "probe_samples": 100}}
    plan["name"] = "other"
    path.write_text(yaml.safe_dump(plan))
    refused = cli("study", "--scale", path, "--out", out, check=False)
    assert refused.returncode == 2 and "holds a study of another scale ('tiny')" in \
        refused.stderr


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    out = folder / "out"
    result = cli("study", "--scale", write_plan(folder), "--out", out)
    return folder, out, result


def _records(out: Path) -> dict[str, list[int]]:
    return {str(p.relative_to(out)): [r["step"] for r in read_jsonl(p)]
            for p in sorted(out.glob("*/runs/*/metrics/steps.jsonl"))}


def test_tiny_study_end_to_end(tiny_study):
    folder, out, result = tiny_study
    for verdict_line in ("The paper's claims, here", "Fig. 1a", "Fig. 3c"):
        assert verdict_line in result.stdout
    assert "every part done" in result.stdout
    payload = json.loads((out / "claims.json").read_text())
    assert len(payload["claims"]) == len(CLAIMS)
    assert {c["verdict"] for c in payload["claims"]} <= set(VERDICTS)
    # the tiny runs have what every measured claim needs: lr range, sweeps, analysis
    measured = {c["id"] for c in payload["claims"] if c["verdict"] != "not measured"}
    assert {"lr-range-supervised-first", "step-small-stays", "step-drop-recover",
            "batch-full-escapes", "signal-student-higher-rank", "sep-collapse-lowest",
            "stab-mse-diverges", "found-finetune"} <= measured
    state = json.loads((out / "study.json").read_text())
    assert list(state["parts"]) == list(PARTS)
    assert all(e["state"] == "done" and e["wall_s"] > 0 for e in state["parts"].values())
    for part in ("lr-range", "step-size", "batch-size", "loss-warmup"):
        assert (out / part).is_dir()
    rep = out / "step-size" / "runs"
    assert len(list(rep.glob("lr=30000_seed=*/analysis.json"))) == 2
    assert len(list(rep.glob("lr=30000_seed=0*/finetune/finetune.json"))) == 1
    # every run's records exactly once
    assert all(steps == sorted(set(steps)) for steps in _records(out).values())

    # a second call trains nothing new and gives the same claims
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/runs/*/metrics/steps.jsonl")}
    again = cli("study", "--scale", folder / "tiny.yaml", "--out", out)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((out / "claims.json").read_text())["claims"] == payload["claims"]
    assert "every part done" in again.stdout

    status = cli("status", out)
    assert "step-size: done (6 of 6 runs finished" in status.stdout


def test_study_report_opens_with_the_claims(tiny_study):
    _, out, _ = tiny_study
    page = (out / "report.html").read_text()
    assert page.index('id="study-answer"') < page.index('id="claims"') < page.index("<figure")
    assert page.count('<td class="verdict') == len(CLAIMS)
    assert 'href="#step-size-fig1c_probe_by_lr"' in page and 'id="step-size-fig1c_probe_by_lr"' \
        in page
    assert 'id="rep-fig2a_erank"' in page


def test_killed_study_resumes_with_each_record_once(tmp_path):
    plan = json.loads(json.dumps(TINY))
    plan["overrides"]["train.steps"] = 400
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "escapelab", "study", "--scale", str(path),
                             "--out", str(out), "--parts", "step-size", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a step-size run has written steps
        if any(len(read_jsonl(p)) > 50 for p in out.glob("step-size/runs/*/metrics/"
                                                         "steps.jsonl")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert cli("status", out, check=False).returncode == 1  # unfinished
    cli("study", "--scale", path, "--out", out, "--parts", "step-size")
    records = _records(out)
    assert len(records) == 6
    assert all(steps == list(range(1, 401)) for steps in records.values())


def test_chromium_reads_the_first_screens(tiny_study):
    if os.environ.get("ESCAPELAB_NO_BROWSER"):
        pytest.skip("ESCAPELAB_NO_BROWSER is set")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed; `make test` installs it, or set "
                    "ESCAPELAB_NO_BROWSER=1")
    from playwright.sync_api import sync_playwright

    _, out, _ = tiny_study
    run = next((out / "step-size" / "runs").glob("lr=30000_seed=0-*"))
    cli("report", run)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox",
                                                                    "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "report.html").as_uri(), wait_until="load")
        answer = page.inner_text("#study-answer")
        rows = page.eval_on_selector_all("#claims tbody tr", "rs => rs.map(r => "
                                         "Array.from(r.cells).map(c => c.innerText))")
        rows = [r for r in rows if len(r) > 1]  # not the group headings
        top = page.eval_on_selector("#claims", "t => t.getBoundingClientRect().top")
        page.goto((run / "report.html").as_uri(), wait_until="load")
        sentence = page.inner_text("#run-sentence")
        tcs = page.eval_on_selector_all("#tcs tr", "rs => rs.map(r => "
                                        "Array.from(r.cells).map(c => c.innerText))")
        box = page.eval_on_selector("#tcs", "t => t.getBoundingClientRect().bottom")
        browser.close()
    claims = json.loads((out / "claims.json").read_text())["claims"]
    assert answer.startswith("At the tiny scale, ")
    assert top < 900 and len(rows) == len(claims)
    assert [r[2] for r in rows] == [c["verdict"] for c in claims]
    summary = json.loads((run / "summary.json").read_text())
    assert sentence.startswith("The student ")
    assert f"{abs(100 * summary['gain']):.2f} points" in sentence
    assert tcs[0] == ["", "teacher T", "collapse C", "final S"]
    assert tcs[1][1] == f"{100 * summary['teacher_probe_acc']:.2f}%" and box < 900
