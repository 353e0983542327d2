"""Figures are drawn from the data on disk: every plotted series is read back from the
figure objects and compared with the files; the HTML report loads in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_overrides
from escapelab.analyze import AnalysisOptions, analyze
from escapelab.config import load_config
from escapelab.lr_range import RangeOptions, run_lr_range
from escapelab.report import load_run, run_figures, sweep_figures, write_report
from escapelab.store import read_jsonl
from escapelab.sweep import SweepSpec, run_sweep
from escapelab.train import train


def _lines(fig):
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()
            if line.get_gid()}


def _by_id(drawn):
    return {d.id: d.figure for d in drawn}


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    train(load_config("digits", tiny_overrides(**{"optim.lr": 3e4})), out)
    analyze(out, AnalysisOptions())
    return out


def test_run_figures_plot_exactly_the_run_data(analysed_run):
    figs = _by_id(run_figures(load_run(analysed_run)))
    assert {"fig1b_loss_grad", "fig1_probe", "extra_eval", "extra_distance", "fig2a_erank",
            "fig2b_dead", "fig2c_condition", "fig3a_between", "fig3b_discriminant",
            "fig3b_kmeans", "fig3c_layer_probe"} <= set(figs)
    evals = [r for r in read_jsonl(analysed_run / "metrics/evals.jsonl")]
    student = [r for r in evals if r["model"] == "student"]
    teacher = next(r for r in evals if r["model"] == "teacher")
    probe = _lines(figs["fig1_probe"])
    np.testing.assert_array_equal(probe["this run"].get_xdata(), [r["step"] for r in student])
    np.testing.assert_allclose(probe["this run"].get_ydata(),
                               [100 * r["probe_acc"] for r in student])
    assert probe["teacher"].get_ydata()[0] == pytest.approx(100 * teacher["probe_acc"])
    steps = read_jsonl(analysed_run / "metrics/steps.jsonl")
    loss = _lines(figs["fig1b_loss_grad"])["this run/loss"]
    positive = [r for r in steps if r["loss"] and r["loss"] > 0]
    np.testing.assert_array_equal(loss.get_xdata(), [r["step"] for r in positive])
    np.testing.assert_allclose(loss.get_ydata(), [r["loss"] for r in positive])
    grad = _lines(figs["fig1b_loss_grad"])["this run/grad_norm"]
    assert len(grad.get_ydata()) == sum(1 for r in steps if r["grad_norm"] > 0)
    dist = _lines(figs["extra_distance"])["dist_teacher"]
    np.testing.assert_allclose(dist.get_ydata(), [r["dist_teacher"] for r in steps])
    knn = _lines(figs["extra_eval"])["knn_acc"]
    np.testing.assert_allclose(knn.get_ydata(), [100 * r["knn_acc"] for r in student])

    # Figs. 2 and 3 against analysis.csv, read here with the csv module.
    with (analysed_run / "analysis.csv").open() as f:
        rows = list(csv.DictReader(f))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for fid, metric, scale in (("fig2a_erank", "erank", 1), ("fig2b_dead", "dead_frac", 100),
                               ("fig2c_condition", "condition_number", 1),
                               ("fig3a_between", "tr_between", 1),
                               ("fig3b_discriminant", "discriminant_rel_teacher", 1),
                               ("fig3c_layer_probe", "probe_acc", 100)):
        lines = _lines(figs[fid])
        for checkpoint in ("T", "C", "S"):
            want = {r["layer"]: float(r["value"]) for r in rows
                    if r["checkpoint"] == checkpoint and r["metric"] == metric and r["value"]}
            x = lines[checkpoint].get_xdata()
            assert [layers[i] for i in x] == [la for la in layers if la in want and
                                              (want[la] > 0 or fid in ("fig2b_dead",
                                                                        "fig3c_layer_probe"))]
            np.testing.assert_allclose(lines[checkpoint].get_ydata(),
                                       [scale * want[layers[i]] for i in x], rtol=1e-12)


def test_sweep_figures_mean_over_seeds_and_mark_divergence(tmp_path):
    over = {o.split("=", 1)[0]: o.split("=", 1)[1]
            for o in tiny_overrides(**{"train.steps": 40, "loss.name": "mse"})}
    spec = SweepSpec(name="lr", base="digits", overrides=over,
                     grid={"optim.lr": [0.01, 1e6], "seed": [0, 1]})
    run_sweep(spec, tmp_path, workers=1)
    figs = _by_id(sweep_figures(tmp_path))
    lines = _lines(figs["fig1c_probe_by_lr"])
    assert "eta=1e+06/diverged" in lines
    meta = json.loads((tmp_path / "sweep.json").read_text())
    runs = [p["run"] for p in meta["points"] if p["values"]["optim.lr"] == "0.01"]
    per_seed = [{r["step"]: r["probe_acc"] for r in read_jsonl(
        tmp_path / "runs" / run / "metrics/evals.jsonl") if r["model"] == "student"}
        for run in runs]
    steps = sorted(per_seed[0])
    np.testing.assert_array_equal(lines["eta=0.01"].get_xdata(), steps)
    np.testing.assert_allclose(lines["eta=0.01"].get_ydata(),
                               [100 * np.mean([s[k] for s in per_seed]) for k in steps])
    legend = [t.get_text() for t in figs["fig1c_probe_by_lr"].axes[0].get_legend().get_texts()]
    assert "eta=1e+06 (diverged)" in legend
    # the phase diagram: one cell per step size, coloured by the table's phase
    cells = _phase_cells(figs["fig_phase_diagram"])
    table = {r["optim.lr"]: r["phase"] for r in csv.DictReader(
        (tmp_path / "table.csv").open())}
    assert cells == {(0, 0): table["0.01"], (1, 0): "diverges"}
    page = write_report(tmp_path)
    text = page.read_text()
    assert "phase-diverges" in text and "Fig. 1c" in text
    assert (tmp_path / "figures" / "fig1c_probe_by_lr.pdf").stat().st_size > 1000


def _phase_cells(fig):
    """(column, row) -> phase of each square of a phase diagram (from their gids)."""
    out = {}
    for patch in fig.axes[0].patches:
        gid = patch.get_gid() or ""
        if gid.startswith("phase:"):
            _, i, j, phase = gid.split(":")
            out[(int(i), int(j))] = phase
    return out


def test_batch_size_and_loss_warmup_sweeps_give_figs_1b_1d_and_4(tmp_path):
    over = {o.split("=", 1)[0]: o.split("=", 1)[1]
            for o in tiny_overrides(**{"train.steps": 20, "optim.lr": 1e3})}
    run_sweep(SweepSpec(name="b", base="digits", overrides=over,
                        grid={"data.batch_size": [32, "full"], "seed": [0]}),
              tmp_path / "b", workers=1)
    figs = _by_id(sweep_figures(tmp_path / "b"))
    assert {"fig1d_probe_by_batch", "fig1b_loss_grad"} <= set(figs)
    assert set(_lines(figs["fig1d_probe_by_batch"])) >= {"B=32", "B=full"}
    run_sweep(SweepSpec(name="w", base="digits", overrides=over,
                        grid={"loss.name": ["mse", "nmse"],
                              "schedule": [{"label": "constant", "schedule.name": "constant"},
                                           {"label": "warm", "schedule.name": "linear_warmup",
                                            "schedule.warmup_steps": 10}]}),
              tmp_path / "w", workers=1)
    figs = _by_id(sweep_figures(tmp_path / "w"))
    assert len(_phase_cells(figs["fig_phase_diagram"])) == 4  # loss x schedule
    lines = _lines(figs["fig4_loss_warmup"])
    assert {"constant/mse/loss", "warm/nmse/probe_acc"} <= set(lines)
    meta = json.loads((tmp_path / "w/sweep.json").read_text())
    run = next(p["run"] for p in meta["points"]
               if p["values"] == {"loss.name": "nmse", "schedule": "warm"})
    evals = [r for r in read_jsonl(tmp_path / "w/runs" / run / "metrics/evals.jsonl")
             if r["model"] == "student"]
    np.testing.assert_allclose(lines["warm/nmse/probe_acc"].get_ydata(),
                               [100 * r["probe_acc"] for r in evals])


def test_lr_range_figure(tmp_path):
    payload = run_lr_range(load_config("digits", tiny_overrides()), tmp_path,
                           RangeOptions(steps=40, seeds=(0,)))
    write_report(tmp_path)
    from escapelab.plots import lr_range_figure

    lines = _lines(lr_range_figure(payload))
    band = payload["band"]["supervised"]
    np.testing.assert_allclose(lines["supervised/median"].get_ydata(),
                               [v for v in band["median"] if v > 0])
    if payload["curves"]["supervised"]["diverge_lr"] is not None:
        assert lines["supervised/diverge_lr"].get_xdata()[0] == pytest.approx(
            payload["curves"]["supervised"]["diverge_lr"])
    assert (tmp_path / "figures" / "fig1a_lr_range.png").exists()


def test_report_loads_in_headless_chromium(analysed_run, tmp_path):
    if os.environ.get("ESCAPELAB_NO_BROWSER"):
        pytest.skip("ESCAPELAB_NO_BROWSER is set")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed; `make test` installs it (Debian: apt-get "
                    "install chromium), or set ESCAPELAB_NO_BROWSER=1")
    from playwright.sync_api import sync_playwright

    page_path = write_report(analysed_run)
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        messages, failures = [], []
        page.on("console", lambda m: messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: failures.append(str(e)))
        page.on("requestfailed", lambda r: failures.append(r.url))
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, "
                               "i.naturalWidth, i.naturalHeight])")
        page.screenshot(path=str(shot), full_page=True)
        title = page.title()
        browser.close()
    assert [m for m in messages if m[0] == "error"] == [] and failures == []
    assert len(images) == len(list((analysed_run / "figures").glob("*.png"))) >= 10
    assert all(c and w > 100 and h > 100 for c, w, h in images)
    assert "escapelab run" in title
    assert shot.stat().st_size > 50_000


def test_report_cli(analysed_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "escapelab", "report", str(analysed_run)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "report.html" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "escapelab", "report", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_the_report_never_writes_or_deletes_through_a_link(analysed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(analysed_run, run)
    write_report(run)
    manifest = json.loads((run / "figures" / "manifest.json").read_text())
    assert "fig1_probe.png" in manifest and "fig1_probe.pdf" in manifest
    # a user's own file in figures/ stays; a figure the report wrote and no longer draws
    # goes; a figure file that is a link is replaced, its target untouched
    (run / "figures" / "my_notes.png").write_bytes(b"mine")
    (run / "figures" / "fig_old.png").write_bytes(b"old")
    (run / "figures" / "manifest.json").write_text(json.dumps([*manifest, "fig_old.png"]))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "figures" / "fig1_probe.png").unlink()
    (run / "figures" / "fig1_probe.png").symlink_to(victim)
    write_report(run)
    assert victim.read_text() == "precious"
    assert not (run / "figures" / "fig1_probe.png").is_symlink()
    assert (run / "figures" / "fig1_probe.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "figures" / "my_notes.png").read_bytes() == b"mine"
    assert not (run / "figures" / "fig_old.png").exists()
    # figures/ itself a link to another folder: refused in one line, nothing touched there
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.png").write_bytes(b"holiday")
    shutil.rmtree(run / "figures")
    (run / "figures").symlink_to(photos)
    result = subprocess.run([sys.executable, "-m", "escapelab", "report", str(run)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is a symbolic link" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.png"]


def test_hostile_strings_reach_the_page_as_text(tmp_path):
    folder = tmp_path / "lr"
    run_lr_range(load_config("digits", tiny_overrides()), folder,
                 RangeOptions(steps=30, seeds=(0,)))
    payload = json.loads((folder / "lr_range.json").read_text())
    payload["curves"]["escape"]["depart_lr"] = "<script>alert(1)</script>"
    (folder / "lr_range.json").write_text(json.dumps(payload))
    page = write_report(folder).read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    # a sweep label with TeX that matplotlib cannot parse is drawn as text
    spec = SweepSpec(name="tex", base="digits", overrides={
        k: v for k, v in (o.split("=", 1) for o in tiny_overrides(**{"train.steps": 20}))},
        grid={"schedule": [{"label": r"$\undefinedmacro$", "schedule.name": "constant"}]})
    run_sweep(spec, tmp_path / "sweep", workers=1)
    assert (write_report(tmp_path / "sweep")).exists()
