"""The probes against scikit-learn: the logistic regression's objective (the float64
formula in escapelab.reference), its solutions and accuracies on four kinds of features,
warm starts, float32, the kNN's predictions, and the Evaluator's warm state."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from escapelab.config import load_config
from escapelab.data import load_dataset
from escapelab.init import make_teacher_student
from escapelab.models import build_model
from escapelab.probe import (
    DEFAULT_TOL,
    Standardizer,
    extract,
    fit_logistic,
    knn_accuracy,
    knn_predict,
    linear_probe,
    linear_probe_accuracy,
)
from escapelab.reference import logistic_gradient, logistic_objective
from escapelab.train import build


@pytest.fixture(autouse=True)
def _one_thread():
    """These fits are small: on a shared machine two threads of torch or of scikit-learn's
    OpenMP/BLAS pools spin against other jobs and can take 100x longer (measured)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield

# -- feature sets ----------------------------------------------------------------------------


def _blobs(n, d, classes, spread, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 4
    y = np.arange(n) % classes
    return centers[y] + spread * rng.standard_normal((n, d)), y


def _split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _encoder():
    """Digits through a random (teacher) convnet of the digits default: 1257 + 540
    images, 64 ReLU features."""
    cfg = load_config("digits")
    data = load_dataset(cfg.data)
    template = build_model(cfg.model, data.input_shape, cfg.model.d_out)
    teacher, _ = make_teacher_student(template, cfg.init, 3, 4, torch.float32, "cpu")
    f_tr, _ = extract(teacher, data.x_train, 512)
    f_te, _ = extract(teacher, data.x_test, 512)
    return (f_tr.double().numpy(), data.y_train.numpy(), f_te.double().numpy(),
            data.y_test.numpy())


def _gaussian():
    """Overlapping Gaussian blobs: 5 classes in 20 dimensions."""
    x, y = _blobs(900, 20, 5, 6.0, 0)
    return _split(x, y, 600)


def _ill_conditioned():
    """Column scales from 1 down to 1e-6 and nearly collinear column pairs (after
    standardization the pairs stay ~1e-3 apart: a Hessian condition of ~1e6)."""
    rng = np.random.default_rng(1)
    x, y = _blobs(900, 12, 4, 5.0, 1)
    twins = x + 1e-3 * rng.standard_normal(x.shape)
    x = np.hstack([x, twins]) * np.logspace(0, -6, 24)
    return _split(x, y, 600)


def _collapsed():
    """Most units dead (all zero) or constant, a few informative, some copies."""
    x, y = _blobs(900, 4, 4, 5.0, 2)
    copies = x[:, :1] * np.array([[0.5, 2.0, -3.0]])
    dead = np.zeros((900, 40))
    constant = np.full((900, 10), 0.1)  # 0.1 is inexact: the variance is rounding only
    x = np.hstack([dead[:, :20], x, constant, copies, dead[:, 20:]])
    return _split(x, y, 600)


CASES = {"encoder": _encoder, "gaussian": _gaussian, "ill_conditioned": _ill_conditioned,
         "collapsed": _collapsed}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return CASES[request.param]()


def _sklearn(x_tr, y_tr, tol=1e-4, C=1.0):
    x_tr = np.asarray(x_tr, np.float64)  # float32 input would make sklearn fit in float32
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=C, tol=tol, max_iter=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(scaler.transform(x_tr), y_tr)
    return scaler, clf


def _objective(fit, x_std, y, C=1.0):
    return logistic_objective(fit.weight.double().numpy(), fit.bias.double().numpy(), x_std,
                              y, C)


# -- the objective is scikit-learn's ---------------------------------------------------------


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("classes", [2, 5])
def test_sklearn_minimizes_the_reference_objective(C, classes):
    """scikit-learn's solution is a stationary point of the reference formula (mean CE
    + ||W||^2 / (2 C n)); under the other common convention, mean CE + ||W||^2 / (2 C),
    it is not. Its `tol` bounds the max-norm of exactly this gradient."""
    x, y = _blobs(400, 6, classes, 5.0, 3)
    x = StandardScaler().fit_transform(x)
    for tol in (1e-4, 1e-8):
        clf = LogisticRegression(C=C, tol=tol, max_iter=100_000).fit(x, y)
        assert clf.coef_.shape[0] == (1 if classes == 2 else classes)
        g_w, g_b = logistic_gradient(clf.coef_, clf.intercept_, x, y, C)
        assert max(np.abs(g_w).max(), np.abs(g_b).max()) <= tol
    other = g_w + clf.coef_ * (1 / C - 1 / (C * len(y)))  # gradient of the other form
    assert np.abs(other).max() > 1e-3


def test_the_fast_objective_and_gradient_are_the_reference_formulas():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((50, 7)), np.arange(50) % 3
    for rows, classes in ((3, 3), (1, 2)):
        yk = y % classes
        w, b = rng.standard_normal((rows, 7)), rng.standard_normal(rows)
        from escapelab.probe import logistic_loss_grad

        loss, g_w, g_b = logistic_loss_grad(torch.from_numpy(w), torch.from_numpy(b),
                                            torch.from_numpy(x), torch.from_numpy(yk),
                                            classes, 0.3)
        assert float(loss) == pytest.approx(logistic_objective(w, b, x, yk, 0.3), rel=1e-13)
        want_w, want_b = logistic_gradient(w, b, x, yk, 0.3)
        np.testing.assert_allclose(g_w.numpy(), want_w, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(g_b.numpy(), want_b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_standardizer_is_standard_scaler_and_never_nan(chunk_rows, monkeypatch):
    x_tr, _, x_te, _ = _collapsed()
    if chunk_rows is not None:  # row blocks of 7 rows: the same statistics
        import escapelab.probe as probe

        monkeypatch.setattr(probe, "CHUNK_BYTES", 8 * x_tr.shape[1] * chunk_rows)
    ours = Standardizer.fit(torch.from_numpy(x_tr))
    theirs = StandardScaler().fit(x_tr)
    np.testing.assert_allclose(ours.scale.numpy(), theirs.scale_, rtol=1e-12)
    got = ours.transform(torch.from_numpy(x_te)).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, theirs.transform(x_te), rtol=1e-10, atol=1e-12)
    assert (ours.scale.numpy() == 1.0).sum() == 50  # 40 dead and 10 at 0.1


# -- solutions and accuracies on four kinds of features ----------------------------------------


def test_torch_reaches_sklearns_optimum(case):
    """Both solvers run to 1e-8: the same objective to 1e-6, ours no higher."""
    x_tr, y_tr, _, _ = case
    scaler, clf = _sklearn(x_tr, y_tr, tol=1e-8)
    x_std = scaler.transform(x_tr)
    f_sklearn = logistic_objective(clf.coef_, clf.intercept_, x_std, y_tr, 1.0)
    _, fit = linear_probe(x_tr, y_tr, x_tr[:5], y_tr[:5], tol=1e-8, max_iter=100_000)
    f_torch = _objective(fit, x_std, y_tr)
    assert fit.converged and fit.n_iter > 0
    assert f_torch == pytest.approx(fit.objective, rel=1e-12)  # its own f is the formula
    assert abs(f_torch - f_sklearn) <= 1e-6 * f_sklearn
    assert f_torch <= f_sklearn * (1 + 1e-6)


def test_default_probe_is_at_least_as_good_as_sklearns_default(case):
    """At the defaults (ours tol 1e-5, scikit-learn's 1e-4) our objective is no higher
    than scikit-learn's, and the test accuracies agree within half a point."""
    x_tr, y_tr, x_te, y_te = case
    scaler, clf = _sklearn(x_tr, y_tr)
    x_std = scaler.transform(x_tr)
    acc, fit = linear_probe(x_tr, y_tr, x_te, y_te)
    assert fit is not None and fit.converged
    assert _objective(fit, x_std, y_tr) <= logistic_objective(
        clf.coef_, clf.intercept_, x_std, y_tr, 1.0) * (1 + 1e-6)
    assert acc == pytest.approx(clf.score(scaler.transform(x_te), y_te), abs=0.005)
    assert acc == linear_probe_accuracy(x_tr, y_tr, x_te, y_te)
    sk = linear_probe_accuracy(x_tr, y_tr, x_te, y_te, solver="sklearn")
    assert sk == pytest.approx(acc, abs=0.005)


def test_float32_is_close_to_float64(case):
    x_tr, y_tr, x_te, y_te = case
    x_std = StandardScaler().fit(x_tr).transform(x_tr)
    acc64, fit64 = linear_probe(x_tr, y_tr, x_te, y_te)
    acc32, fit32 = linear_probe(torch.from_numpy(x_tr).float(), y_tr,
                                torch.from_numpy(x_te).float(), y_te, dtype="float32")
    assert fit32.weight.dtype == torch.float32
    assert _objective(fit32, x_std, y_tr) == pytest.approx(_objective(fit64, x_std, y_tr),
                                                           rel=1e-4)
    assert acc32 == pytest.approx(acc64, abs=0.005)


def test_two_classes_fit_sklearns_binomial_model():
    x, y = _blobs(300, 5, 2, 5.0, 5)
    scaler, clf = _sklearn(x, y, tol=1e-10)
    _, fit = linear_probe(x, y + 3, x, y + 3, tol=1e-10)  # labels 3 and 4
    assert fit.weight.shape == (1, 5) and fit.classes.tolist() == [3, 4]
    np.testing.assert_allclose(fit.weight.numpy(), clf.coef_, rtol=1e-5, atol=1e-7)
    x_std = torch.from_numpy(scaler.transform(x))
    np.testing.assert_array_equal(fit.predict(x_std).numpy(), clf.predict(x_std.numpy()) + 3)


def test_non_finite_features_give_none():
    x, y = _blobs(60, 4, 3, 1.0, 6)
    bad = x.copy()
    bad[3, 1] = np.inf
    for solver in ("torch", "sklearn"):
        assert linear_probe_accuracy(bad, y, x, y, solver=solver) is None
        assert linear_probe_accuracy(x, y, x * np.nan, y, solver=solver) is None
        assert knn_accuracy(bad, y, x, y, solver=solver) is None


def test_linear_probe_separates_separable_data_and_not_noise():
    x, y = _blobs(300, 10, 3, 0.1, 0)
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:]) == 1.0
    noise = np.random.default_rng(1).standard_normal((300, 10))
    assert linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


# -- warm start ------------------------------------------------------------------------------


def test_warm_start_reaches_the_same_solution_in_fewer_iterations():
    x_tr, y_tr, x_te, y_te = _encoder()
    rng = np.random.default_rng(7)
    # The next evaluation's features: the same encoder a little further in training.
    moved = x_tr * (1 + 0.05 * rng.standard_normal(x_tr.shape[1])) \
        + 0.02 * rng.standard_normal(x_tr.shape) * x_tr.std(0)
    moved_te = x_te * 1.0
    for tol in (DEFAULT_TOL, 1e-8):
        _, first = linear_probe(x_tr, y_tr, x_te, y_te, tol=tol)
        acc_cold, cold = linear_probe(moved, y_tr, moved_te, y_te, tol=tol)
        acc_warm, warm = linear_probe(moved, y_tr, moved_te, y_te, tol=tol, init=first)
        assert warm.converged and cold.converged
        assert 0 < warm.n_iter <= cold.n_iter
        assert warm.objective == pytest.approx(cold.objective, rel=max(tol, 1e-12))
        assert acc_warm == pytest.approx(acc_cold, abs=0.005)
        if tol == DEFAULT_TOL:  # the part of the path a warm start saves
            assert warm.n_iter < 0.7 * cold.n_iter, (warm.n_iter, cold.n_iter)
    # At 1e-8 both are the optimum itself.
    np.testing.assert_allclose(warm.weight.numpy(), cold.weight.numpy(), rtol=0,
                               atol=1e-5 * float(cold.weight.abs().max()))
    # An optimal start needs no iteration at all.
    _, again = linear_probe(moved, y_tr, moved_te, y_te, tol=1e-8, init=warm)
    assert again.n_iter == 0 and torch.equal(again.weight, warm.weight)


def test_a_start_of_another_shape_or_classes_is_ignored():
    x, y = _blobs(200, 6, 4, 3.0, 8)
    _, cold = linear_probe(x, y, x, y)
    _, other = linear_probe(x[:, :5], y, x[:, :5], y)  # another width: cold start
    _, relabeled = linear_probe(x, y + 1, x, y + 1, init=cold)  # other labels: cold start
    _, fit = linear_probe(x[:, :5], y, x[:, :5], y, init=cold)
    assert fit.n_iter == other.n_iter and relabeled.n_iter == cold.n_iter


def test_fit_logistic_counts_iterations_and_stops_at_max_iter():
    x, y = _blobs(300, 8, 3, 6.0, 9)
    x = torch.from_numpy(StandardScaler().fit_transform(x))
    fit = fit_logistic(x, torch.from_numpy(y), 3, tol=1e-12, max_iter=3)
    assert fit.n_iter == 3 and not fit.converged and fit.grad_max > 1e-12


# -- the Evaluator ---------------------------------------------------------------------------


def test_evaluator_warm_starts_and_its_state_survives_a_checkpoint(tiny_config):
    setup = build(tiny_config(**{"data.synthetic.noise": 3.0}))
    evaluator, student = setup.evaluator, setup.student
    first = evaluator(setup.teacher)
    fit_t = evaluator.last_fit
    assert fit_t is not None and fit_t.n_iter > 0
    again = evaluator(setup.teacher)  # from its own optimum: no iteration, same record
    assert again == {**first, "probe_iter": 0} and evaluator.last_fit.n_iter == 0
    assert first["probe_iter"] == fit_t.n_iter and first["probe_grad"] == fit_t.grad_max
    assert first["probe_grad"] <= setup.cfg.probe.tol
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p) * p.std())
    saved = evaluator.state()
    warm = evaluator(student)
    # A fresh evaluator loaded with the saved state repeats the warm fit exactly.
    other = build(tiny_config(**{"data.synthetic.noise": 3.0})).evaluator
    other.load_state({k: v.clone() for k, v in saved.items()})
    assert other(student) == warm
    assert torch.equal(other.last_fit.weight, evaluator.last_fit.weight)
    # Without the state (or with warm_start off) the fit is cold: more iterations.
    cold = build(tiny_config(**{"data.synthetic.noise": 3.0, "probe.warm_start": False}))
    record = cold.evaluator(student)
    assert cold.evaluator.last_fit.n_iter > evaluator.last_fit.n_iter
    assert cold.evaluator.state() == {}
    assert record["probe_acc"] == pytest.approx(warm["probe_acc"], abs=0.02)
    assert record["knn_acc"] == warm["knn_acc"]


def test_resumable_checkpoints_carry_the_warm_start(tiny_config):
    """TrainState packs the Evaluator's warm start and restores it: a resumed run starts
    its next probe where the uninterrupted run would (bitwise: tests/test_store.py)."""
    from escapelab.train import BatchSampler, Tracker, TrainState

    def parts():
        setup = build(tiny_config())
        sampler = BatchSampler(setup.derived.n_train, 32, 0, torch.device("cpu"))
        return setup, sampler, torch.optim.SGD(setup.student.parameters(), lr=0.1)

    setup, sampler, optimizer = parts()
    setup.evaluator(setup.teacher)
    tensors, _ = TrainState(5, Tracker()).pack(setup.student, sampler, optimizer, setup.cfg,
                                               {}, setup.evaluator)
    assert torch.equal(tensors["probe.weight"], setup.evaluator.last_fit.weight)
    fresh, fresh_sampler, fresh_optimizer = parts()
    assert fresh.evaluator.last_fit is None
    TrainState.restore(tensors, fresh.student, fresh_sampler, fresh_optimizer, fresh.evaluator,
                       fresh.sharpness)
    assert torch.equal(fresh.evaluator.last_fit.weight, setup.evaluator.last_fit.weight)
    assert torch.equal(fresh.evaluator.last_fit.bias, setup.evaluator.last_fit.bias)
    assert fresh.evaluator(fresh.teacher) == setup.evaluator(setup.teacher)
    # A checkpoint written before warm starts existed restores a cold start.
    TrainState.restore({k: v for k, v in tensors.items() if not k.startswith("probe.")},
                       fresh.student, fresh_sampler, fresh_optimizer, fresh.evaluator,
                       fresh.sharpness)
    assert fresh.evaluator.last_fit is None


def test_evaluator_on_probe_subsets(tiny_config):
    """probe.train_samples / test_samples pick stratified subsets (with the run's 63-bit
    probe seed) and the probes use only those."""
    setup = build(tiny_config(**{"probe.train_samples": 100, "probe.test_samples": 60}))
    evaluator = setup.evaluator
    assert len(evaluator.train_idx) == 100 and len(evaluator.test_idx) == 60
    record = evaluator(setup.teacher)
    assert record["probe_acc"] in {i / 60 for i in range(61)}
    assert len(evaluator.last_fit.classes) == setup.derived.num_classes


def test_evaluator_with_the_sklearn_solver_agrees(tiny_config):
    setup = build(tiny_config(**{"probe.solver": "sklearn"}))
    ours = build(tiny_config())
    theirs, mine = setup.evaluator(setup.teacher), ours.evaluator(ours.teacher)
    assert setup.evaluator.last_fit is None and setup.evaluator.state() == {}
    assert theirs["knn_acc"] == mine["knn_acc"]
    assert theirs["probe_acc"] == pytest.approx(mine["probe_acc"], abs=1 / 120 + 1e-9)
    assert theirs["erank"] == pytest.approx(mine["erank"], rel=1e-9)


# -- kNN -------------------------------------------------------------------------------------


def _sklearn_knn(x_tr, y_tr, x_te, k):
    knn = KNeighborsClassifier(n_neighbors=min(k, len(y_tr)), metric="cosine",
                               algorithm="brute")
    return knn.fit(x_tr, y_tr).predict(x_te)


def _knn_sets():
    rng = np.random.default_rng(10)
    sets = []
    x, y = _blobs(400, 6, 4, 3.0, 2)
    sets.append(("blobs", *_split(x, y, 300)))
    # Classes of 2 to 5 points (k beyond a class's size), unequal counts.
    y = np.repeat(np.arange(5), [2, 3, 5, 4, 2])
    x = rng.standard_normal((len(y), 5)) + y[:, None]
    sets.append(("tiny classes", x, y, rng.standard_normal((40, 5)) + 2, np.zeros(40, int)))
    # Duplicated training points (with their labels) and test points equal to them.
    x, y = _blobs(200, 8, 3, 4.0, 11)
    x_tr = np.vstack([x[:150], x[:40], x[100:110]])
    y_tr = np.concatenate([y[:150], y[:40], y[100:110]])
    x_te = np.vstack([x[150:], x[:20], x[105:108]])
    sets.append(("duplicates", x_tr, y_tr, x_te, np.concatenate([y[150:], y[:20],
                                                                 y[105:108]])))
    # Wide, nonnegative (ReLU-like) features with labels not starting at 0.
    x = np.maximum(rng.standard_normal((500, 64)), 0)
    y = 3 + (x[:, :3].sum(1) > 1.2).astype(int) + (x[:, 3] > 0.5)
    sets.append(("relu", *_split(x, y, 350)))
    return sets


@pytest.mark.parametrize("k", [1, 4, 7, 20, 1000])
@pytest.mark.parametrize("name,x_tr,y_tr,x_te,y_te", _knn_sets(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_knn_predicts_exactly_what_sklearn_predicts(name, x_tr, y_tr, x_te, y_te, k):
    pred = knn_predict(x_tr, y_tr, x_te, k)
    np.testing.assert_array_equal(pred.numpy(), _sklearn_knn(x_tr, y_tr, x_te, k))
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k) == knn_accuracy(
        x_tr, y_tr, x_te, y_te, k, solver="sklearn")
    # One test row per chunk gives the same as everything in one chunk.
    np.testing.assert_array_equal(knn_predict(x_tr, y_tr, x_te, k, chunk_bytes=1).numpy(),
                                  pred.numpy())
    np.testing.assert_array_equal(
        knn_predict(x_tr, y_tr, x_te, k, chunk_bytes=2**34).numpy(), pred.numpy())


def test_knn_float32_and_chunks_on_encoder_features():
    x_tr, y_tr, x_te, y_te = _encoder()
    want = _sklearn_knn(x_tr.astype(np.float64), y_tr, x_te.astype(np.float64), 20)
    np.testing.assert_array_equal(knn_predict(x_tr, y_tr, x_te, 20).numpy(), want)
    np.testing.assert_array_equal(knn_predict(x_tr, y_tr, x_te, 20, chunk_bytes=10**6)
                                  .numpy(), want)
    f32 = knn_predict(x_tr, y_tr, x_te, 20, dtype="float32").numpy()
    assert np.mean(f32 == want) >= 0.99


def _knn_lowest_index_rule(x_tr, y_tr, x_te, k):
    """sklearn's distances; among equal distances the lower training index first."""
    a = x_tr / np.linalg.norm(x_tr, axis=1, keepdims=True)
    b = x_te / np.linalg.norm(x_te, axis=1, keepdims=True)
    dist = np.clip(1 - b @ a.T, 0, 2)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.array([np.bincount(y_tr[row], minlength=y_tr.max() + 1).argmax()
                     for row in nearest])


def test_knn_breaks_exact_distance_ties_by_training_index_and_votes_by_smallest_label():
    # Three copies of one point with labels 2, 0, 1, then far points of label 3.
    x_tr = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    y_tr = np.array([2, 0, 1, 3, 3])
    x_te = np.array([[2.0, 0, 0], [1.0, 1.0, 0.0]])
    for k in (1, 2, 3, 4, 5):
        want = _knn_lowest_index_rule(x_tr, y_tr, x_te, k)
        np.testing.assert_array_equal(knn_predict(x_tr, y_tr, x_te, k).numpy(), want)
    # k = 1 takes the first copy (label 2); k = 2 a 2-0 tie -> 0; k = 3: 2-0-1 -> 0.
    assert knn_predict(x_tr, y_tr, x_te[:1], 1).tolist() == [2]
    assert knn_predict(x_tr, y_tr, x_te[:1], 2).tolist() == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probes_on_cuda_match_the_cpu():
    x_tr, y_tr, x_te, y_te = _encoder()
    dev = [torch.from_numpy(a).cuda() for a in (x_tr, y_tr, x_te, y_te)]
    acc, fit = linear_probe(*dev)
    acc_cpu, fit_cpu = linear_probe(x_tr, y_tr, x_te, y_te)
    assert fit.weight.is_cuda
    assert fit.objective == pytest.approx(fit_cpu.objective, rel=1e-6)
    assert acc == pytest.approx(acc_cpu, abs=0.005)
    np.testing.assert_array_equal(knn_predict(*dev[:3], 20).cpu().numpy(),
                                  knn_predict(x_tr, y_tr, x_te, 20).numpy())


def test_the_benchmark_runs_on_tiny_sizes(tmp_path):
    """bench/bench_probe.py --quick: every digits part on tiny sizes, a complete JSON."""
    path = Path(__file__).parents[1] / "bench" / "bench_probe.py"
    spec = importlib.util.spec_from_file_location("bench_probe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probe.json"
    bench.main(["--quick", "--skip-fm", "--out", str(out)])
    result = json.loads(out.read_text())
    cold = result["digits_cold"]
    assert {"sklearn", "torch_float64", "torch_float32"} <= set(cold)
    assert abs(cold["torch_float64"]["accuracy_diff_points"]) <= 0.5
    seq = result["digits_sequence"]
    assert seq["schedule"][:3] == [0, 1, 2] and len(seq["steps"]) == len(seq["schedule"]) + 1
    summary = seq["summary"]["torch_float64_warm"]
    assert summary["iterations"] < seq["summary"]["torch_float64_cold"]["iterations"]
    assert summary["max_objective_rel_vs_sklearn"] <= 1e-4
    assert set(result["verdict"]) >= {"digits_cold/torch_float64",
                                      "digits_sequence/torch_float64_warm"}


@pytest.mark.parametrize("classes", [2, 4])
def test_preconditioned_lbfgs_minimizes_the_same_objective(classes):
    """Strongly correlated features (a random ReLU layer on a 6-d signal, condition of
    the second moment ~1e6): the preconditioned fit and the plain one reach the same
    optimum, checked with the float64 NumPy objective and gradient, cold and warm."""
    rng = np.random.default_rng(3)
    signal, y = _blobs(600, 6, classes, 1.5, 4)
    mix = rng.standard_normal((6, 80))
    x = np.maximum(signal @ mix + 0.01 * rng.standard_normal((600, 80)), 0.0)
    xs = StandardScaler().fit_transform(x)
    assert np.linalg.cond(xs.T @ xs) > 1e5
    xt, yt = torch.from_numpy(xs), torch.from_numpy(y)
    plain = fit_logistic(xt, yt, classes, tol=1e-7, precondition=False, max_iter=5000)
    pre = fit_logistic(xt, yt, classes, tol=1e-7, precondition=True, max_iter=5000)
    assert plain.converged and pre.converged
    for fit in (plain, pre):
        w, b = fit.weight.numpy(), fit.bias.numpy()
        grad_w, grad_b = logistic_gradient(w, b, xs, y, 1.0)
        assert max(np.abs(grad_w).max(), np.abs(grad_b).max()) <= 1e-7 * (1 + 1e-6)
    f_plain = logistic_objective(plain.weight.numpy(), plain.bias.numpy(), xs, y, 1.0)
    f_pre = logistic_objective(pre.weight.numpy(), pre.bias.numpy(), xs, y, 1.0)
    assert f_pre == pytest.approx(f_plain, rel=1e-8)
    # warm from a nearby start: same optimum again
    warm = fit_logistic(xt, yt, classes, tol=1e-7, precondition=True, max_iter=5000,
                        init=(plain.weight * 0.9, plain.bias * 0.9))
    assert warm.converged and warm.objective == pytest.approx(f_plain, rel=1e-8)
