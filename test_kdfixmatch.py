"""Tests for kdfixmatch.py and kernels.py. Run: python -m pytest -q test_kdfixmatch.py"""
import os

import torch

# Without a GPU, kernels.py's Triton kernels run on CPU tensors in the Triton interpreter. triton
# reads TRITON_INTERPRET when kernels.py is imported (at @triton.jit), so this stays above every
# import of kernels or kdfixmatch in this file.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ---- kdfixmatch.py: each step against its definition, bad input, resume, learning on real data
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import kdfixmatch as kd  # noqa: E402
import kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
CIFAR_JPEG = HERE.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def run_cli(*argv, timeout=600):
    return subprocess.run([sys.executable, str(HERE / "kdfixmatch.py"), *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


def test_sce_loss_matches_hand_computed_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])   # p = (.25,.75), (.75,.25)
    target = torch.tensor([1, 1])
    ce = torch.tensor([-math.log(0.75), -math.log(0.25)])
    rce = 4.0 * torch.tensor([0.25, 0.75])                       # -A * (1 - p_y), A = -4
    want = 0.1 * ce + 1.0 * rce
    torch.testing.assert_close(kd.sce_loss(logits, target, reduction="none"), want)
    torch.testing.assert_close(kd.sce_loss(logits, target), want.mean())
    torch.testing.assert_close(kd.sce_loss(logits, target, reduction="sum"), want.sum())
    # alpha=1, beta=0 is plain CE; A = ln 1e-4 is the authors' released-code variant
    torch.testing.assert_close(kd.sce_loss(logits, target, 1.0, 0.0), F.cross_entropy(logits, target))
    A = math.log(1e-4)
    torch.testing.assert_close(kd.sce_loss(logits, target, 6.0, 0.1, A, "none"),
                               6.0 * ce + 0.1 * -A * torch.tensor([0.25, 0.75]))


def test_kernel_reference_sce_agrees_with_sce_loss():
    g = torch.Generator().manual_seed(0)
    weak, strong = torch.randn(16, 7, generator=g) * 4, torch.randn(16, 7, generator=g)
    loss, mask, target = kernels.masked_pseudo_label_loss_torch(weak, strong, 0.5, None, "sce",
                                                               0.3, 2.0, -6.0)
    rows = kd.sce_loss(strong, target, 0.3, 2.0, -6.0, "none")
    torch.testing.assert_close(loss, (rows * mask).sum() / 16)


def test_select_confident_threshold_edges():
    probs = torch.tensor([[0.80, 0.20], [0.7999, 0.2001], [0.1, 0.9], [0.5, 0.5]], dtype=torch.float64)
    idx, labels = kd.select_confident(probs, 0.80)
    assert idx.tolist() == [0, 2] and labels.tolist() == [0, 1]     # >= tau_select, not >
    idx, _ = kd.select_confident(probs, 0.0)
    assert idx.tolist() == [0, 1, 2, 3]
    idx, labels = kd.select_confident(probs, 1.0)
    assert len(idx) == 0 and len(labels) == 0


def test_fixmatch_step_mask_mean_over_all_rows_and_no_gradient_through_weak():
    model = lambda x: x                                  # the "images" are the logits themselves
    x_l = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    y_l = torch.tensor([0])
    x_w = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 9.0], [0.3, 0.0, 0.0]],
                       requires_grad=True)            # rows 0 and 2 are confident (> 0.95)
    x_s = torch.randn(4, 3, requires_grad=True)
    loss, s = kd.fixmatch_step(model, x_l, y_l, x_w, x_s, tau=0.95, lambda_u=2.0)
    assert s["mask"].tolist() == [1.0, 0.0, 1.0, 0.0]
    ce_s = F.cross_entropy(x_s.detach(), torch.tensor([0, 1, 2, 0]), reduction="none")
    want_u = (ce_s[0] + ce_s[2]) / 4                     # averaged over all mu*B rows, not the kept 2
    want = F.cross_entropy(x_l.detach(), y_l) + 2.0 * want_u
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert torch.count_nonzero(x_w.grad) == 0            # pseudo labels carry no gradient
    g = (x_s.detach().softmax(1) - F.one_hot(torch.tensor([0, 1, 2, 0]), 3)) * 2.0 / 4
    torch.testing.assert_close(x_s.grad, g * torch.tensor([[1.0], [0.0], [1.0], [0.0]]))


def test_fixmatch_step_is_one_forward_pass_over_all_views():
    calls = []
    model = lambda x: calls.append(len(x)) or x
    kd.fixmatch_step(model, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                     torch.zeros(6, 3), torch.zeros(6, 3))
    assert calls == [14]                                 # shared BatchNorm statistics


def test_heuristic_1_three_cases():
    weak = torch.tensor([[0.0, 0.0, 20.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    strong = torch.randn(4, 3)
    trusted = torch.tensor([1, 1, -1, -1])
    loss, mask, target = kernels.masked_pseudo_label_loss(weak, strong, 0.95, trusted)
    # 1. inner confident (rows 0, 3): its own label wins, trusted or not
    # 2. not confident but trusted (row 1): the outer label; 3. neither (row 2): masked
    assert mask.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert [target[i].item() for i in (0, 1, 3)] == [2, 1, 1]
    ce = F.cross_entropy(strong, target, reduction="none")
    torch.testing.assert_close(loss, (ce[0] + ce[1] + ce[3]) / 4)
    _, s = kd.fixmatch_step(lambda x: x, torch.zeros(1, 3), torch.zeros(1).long(), weak, strong,
                            tau=0.95, trusted=trusted)          # and so does the training step
    assert s["mask"].tolist() == mask.tolist() and torch.equal(s["pseudo"], target)


def test_sinkhorn_rows_sum_to_one_and_balances_a_skewed_batch():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(256, 10, generator=g) * 0.2
    scores[:, 0] += 0.5                                  # every sample prefers prototype 0
    q = kd.sinkhorn(scores, eps=0.05, iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(256))
    skew = (scores / 0.05).softmax(1).sum(0)             # plain softmax: prototype 0 takes it all
    assert skew[0] > 200
    assert (q.sum(0) - 25.6).abs().max() < 0.05 * 25.6  # equal share per prototype (3 iterations)
    q50 = kd.sinkhorn(scores, eps=0.05, iters=50)
    torch.testing.assert_close(q50.sum(0), torch.full((10,), 25.6), rtol=1e-4, atol=1e-3)


def test_suave_step_swapped_prediction_has_no_gradient_through_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), kd.Prototypes(8, 3, bias=False))
    x_l, y_l = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    x_1, x_2 = torch.randn(12, 6), torch.randn(12, 6)
    loss, s = kd.suave_step(model, x_l, y_l, x_1, x_2, temperature=0.1, smoothing=0.01)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    # the same loss with the targets computed beforehand as constants
    model.zero_grad()
    scores = model(torch.cat([x_l, x_1, x_2]))
    s_l, s_1, s_2 = scores[:4], scores[4:16], scores[16:]
    t_1, t_2 = kd.sinkhorn(s_1.detach()), kd.sinkhorn(s_2.detach())
    ce = lambda t, sc: -(t * (sc / 0.1).log_softmax(1)).sum(1).mean()
    loss_u = (ce(t_1, s_2) + ce(t_2, s_1)) / 2
    loss_l = F.cross_entropy(s_l / 0.1, y_l, label_smoothing=0.01)
    want = (4 * loss_l + 12 * loss_u) / 16               # weighted by share of the batch
    torch.testing.assert_close(loss, want)
    want.backward()
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad)
    assert torch.equal(s["pseudo"], t_1.argmax(1))
    with torch.no_grad():                                # scores are cosines: prototypes unit norm
        assert float(model(torch.randn(5, 6)).abs().max()) <= 1 + 1e-6


def _blobs(n_per=120, k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 6
    y = torch.arange(k).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), d, generator=g), y


def test_dec_cluster_recovers_planted_clusters_and_drops_disagreeing_labels():
    z, y = _blobs()
    pseudo = y.clone()
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[torch.arange(0, len(y), 12)] = True          # 1 in 12 planted with a wrong label
    pseudo[flipped] = (y[flipped] + 1) % 4
    keep, info = kd.dec_cluster(z, pseudo, 4, n_init=5)
    assert torch.equal(keep, ~flipped)
    assert sorted(info["cluster_to_class"]) == [0, 1, 2, 3]
    assert info["moved"] < 0.001 or info["iters"] == 2000


def test_dec_cluster_ignores_cluster_numbering():
    z, y = _blobs(seed=1)
    perm = torch.tensor([2, 0, 3, 1])                    # pseudo labels are a relabelling of
    keep, _ = kd.dec_cluster(z, perm[y], 4, n_init=5)    # the clusters: Hungarian undoes it
    assert bool(keep.all())


def test_dec_cluster_with_fewer_candidates_than_classes_keeps_none():
    keep, _ = kd.dec_cluster(torch.randn(3, 5), torch.tensor([0, 1, 2]), 10)
    assert keep.tolist() == [False, False, False]


def test_augment_shapes_dtype_randomness_and_cutout():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    views = [kd.augment(img, strong=s) for s in (False, True) for _ in range(4)]
    for v in views:
        assert v.shape == img.shape and v.dtype == torch.uint8
    assert not all(torch.equal(views[4], v) for v in views[5:])       # random draws differ
    for v in views[4:]:                                  # Cutout is last: a gray box >= a quarter
        assert int((v == 127).all(0).sum()) >= 8 * 8     # of its 16x16 size even at a corner
    torch.manual_seed(1)
    a = kd.augment(img, strong=True)
    torch.manual_seed(1)
    assert torch.equal(a, kd.augment(img, strong=True))               # seeded = reproducible


def test_weak_view_is_a_translated_copy_without_flip():
    torch.manual_seed(0)
    img = torch.arange(64, dtype=torch.uint8).view(1, 8, 8)
    for _ in range(20):
        w = kd.augment(img, flip=False)                  # 12.5% of 8 px = 1 px shift at most
        assert any(torch.equal(w[0, 1:-1, 1:-1], img[0, 1 + dy:7 + dy, 1 + dx:7 + dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_every_randaugment_op_keeps_shape_and_dtype(shape):
    img = torch.randint(0, 256, shape, dtype=torch.uint8)
    for name, op in kd.RA_OPS.items():
        for m, s in ((0.1, 1), (0.9, -1)):
            out = op(img, m, s)
            assert out.shape == img.shape and out.dtype == torch.uint8, name
    assert len(kd.RA_OPS) == 14


def test_wrn28_2_is_fixmatchs_backbone():
    m = kd.build_model("wrn28_2", 3, 10)
    assert sum(p.numel() for p in m.parameters()) == 1_467_610   # as in FixMatch's PyTorch port
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert len(bns) == 25 and all(b.momentum == 0.001 for b in bns)
    assert m.body(torch.randn(2, 3, 32, 32)).shape == (2, 128) and m.head.out_features == 10


def test_efficientnet_weights_offline_error_and_local_file(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as e:
        kd.build_model("efficientnet_b0", 3, 10, pretrained=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--weights FILE" in err and "efficientnet_b0_rwightman" in err
    ref = torchvision.models.efficientnet_b0()                 # a stand-in "ImageNet" file
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    m = kd.build_model("efficientnet_b0", 3, 10, weights=str(tmp_path / "w.pth"))
    torch.testing.assert_close(m.body[0][0][0].weight, ref.features[0][0].weight)
    assert m.head.out_features == 10
    with pytest.raises(SystemExit):
        kd.build_model("efficientnet_b0", 3, 10, weights=str(tmp_path / "missing.pth"))


def test_labeled_split_is_balanced_and_seeded():
    y = torch.arange(10).repeat(30)
    a, b, c = (kd.labeled_split(y, 40, 10, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(y[a], minlength=10).tolist() == [4] * 10
    assert len(set(a.tolist())) == 40


@pytest.mark.parametrize("n, msg", [(45, "not divisible"), (400, "smallest class has 30")])
def test_labeled_split_bad_counts(n, msg, capsys):
    with pytest.raises(SystemExit) as e:
        kd.labeled_split(torch.arange(10).repeat(30), n, 10, 0)
    assert e.value.code == 2 and msg in capsys.readouterr().err


BAD_INPUT = [  # (argv, a piece of the one-line error); {tmp} is the test's temporary directory
    (["--labels", "55"], "--labels 55 is not divisible"),
    (["--labels", "5000"], "smallest class has"),
    (["--steps", "0"], "--steps 0: must be a positive integer"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--tau", "1.5"], "--tau 1.5: must be in [0, 1]"),
    (["--ema", "nan"], "--ema nan: must be in [0, 1]"),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--lr", "inf"], "--lr inf: must be > 0"),
    (["--wd=-1e-4"], "--wd -0.0001: must be >= 0"),
    (["--momentum", "1"], "--momentum 1.0: must be in [0, 1)"),
    (["--method", "suave", "--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
    (["--loss", "sce", "--sce-A", "4"], "--sce-A 4.0: must be < 0"),
    (["--kmeans-init", "0"], "--kmeans-init 0: must be a positive integer"),
    (["--dec-lr", "-1"], "--dec-lr -1.0: must be > 0"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2^31)"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--image-size", "0"], "--image-size 0: must be a positive integer"),
    (["--method", "supervised", "--tau", "0.9"], "--tau does nothing with --method supervised"),
    (["--method", "supervised", "--mu", "3"], "--mu does nothing with --method supervised"),
    (["--method", "fixmatch", "--tau-inner", "0.9"], "--tau-inner does nothing with --method fix"),
    (["--outer-from", "x", "--method", "fixmatch"], "--outer-from does nothing with --method fix"),
    (["--no-dec", "--dec-lr", "0.1"], "--dec-lr does nothing with --no-dec"),
    (["--sce-alpha", "0.5"], "--sce-alpha does nothing with --loss ce"),
    (["--suave-dim", "64"], "--suave-dim does nothing with --method kdfixmatch"),
    (["--pretrained"], "--pretrained does nothing with --arch small_cnn"),
    (["--arch", "wrn28_2", "--weights", "w.pth"], "--weights does nothing with --arch wrn28_2"),
    (["--outer-from", "{tmp}"], "no finished outer SNN (outer.pt)"),
    (["--dataset", "folder", "--data-dir", "/nonexistent"], "--dataset folder needs --data-dir"),
    (["--dataset", "folder", "--data-dir", "{tmp}/only-train"], "(no {tmp}/only-train/test)"),
    (["--device", "gpu"], "--device gpu: unknown; use auto, cpu, cuda or cuda:N"),
    (["--out", ""], "--out '' is not a directory"),
    (["--out", "{tmp}/a-file"], "is not a directory; choose another --out"),
    (["--out", "{tmp}/a-file/run", "--steps", "1"], "cannot write {tmp}/a-file/run (Not a dir"),
    (["--resume", "--out", "/nonexistent/kdfm"], "--resume: nothing to resume"),
] + ([(["--device", "cuda"], "--device cuda: not here (0 GPUs)")] if not torch.cuda.is_available()
     else [])


@pytest.mark.parametrize("argv, needle", BAD_INPUT)
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "only-train" / "train").mkdir(parents=True)
    argv, needle = [a.replace("{tmp}", str(tmp_path)) for a in argv], needle.replace("{tmp}", str(tmp_path))
    r = run_cli(*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "run")]), timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_dataset_offline_names_the_path(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.svhn, "download_url", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    for name in ("svhn", "cifar100"):
        args = kd.get_args(["--dataset", name, "--data-dir", str(tmp_path)])
        with pytest.raises(SystemExit) as e:
            kd.load_dataset(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(tmp_path) in err and "download=True" in err, err


def test_torchvision_loaders_on_small_fixtures(tmp_path, monkeypatch):
    """CIFAR-100 and SVHN in their real on-disk formats (integrity hashes patched: the fixtures
    are not the real files), Food-101 in its folder layout."""
    import scipy.io
    from PIL import Image
    rng = np.random.default_rng(0)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    c = tmp_path / "cifar-100-python"
    c.mkdir()
    for split, n in (("train", 30), ("test", 10)):
        pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     "fine_labels": list(range(n))}, open(c / split, "wb"))
    pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, open(c / "meta", "wb"))
    for split, n in (("train", 20), ("test", 6)):
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat",
                         {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                          "y": (np.arange(n) % 10 + 1)[:, None]})      # SVHN labels are 1..10
    f = tmp_path / "food-101"
    for split, cls in (("train", ["apple_pie", "waffles"]), ("test", ["apple_pie", "waffles"])):
        for k in cls:
            (f / "images" / k).mkdir(parents=True, exist_ok=True)
    meta = {"apple_pie": ["apple_pie/1", "apple_pie/2"], "waffles": ["waffles/3", "waffles/4"]}
    (f / "meta").mkdir()
    json.dump(meta, open(f / "meta" / "train.json", "w"))
    json.dump({"apple_pie": ["apple_pie/5"], "waffles": ["waffles/6"]}, open(f / "meta" / "test.json", "w"))
    for k, ids in (("apple_pie", [1, 2, 5]), ("waffles", [3, 4, 6])):
        for i in ids:
            Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(
                f / "images" / k / f"{i}.jpg")
    for name, n_train, classes, size in (("cifar100", 30, 100, 32), ("svhn", 20, 10, 32),
                                         ("food101", 4, 2, 24)):
        argv = ["--dataset", name, "--data-dir", str(tmp_path), "--workers", "0"]
        d = kd.load_dataset(kd.get_args(argv + (["--image-size", "24"] if name == "food101" else [])))
        assert d["train_x"].shape == (n_train, 3, size, size) and d["train_x"].dtype == torch.uint8
        assert d["classes"] == classes and d["flip"] == (name != "svhn")
        assert int(d["train_y"].min()) >= 0 and int(d["train_y"].max()) < classes
    assert d["train_y"].tolist() == [0, 0, 1, 1]


def _results(out):
    return json.load(open(Path(out) / "results.json"))


def test_killed_run_resumes_every_stage_and_never_redraws_labels(tmp_path):
    out = tmp_path / "run"
    argv = ["--labels", "20", "--steps", "40", "--eval-every", "20", "--batch-size", "16",
            "--mu", "2", "--workers", "0", "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(HERE / "kdfixmatch.py"), *argv], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "ckpt_inner.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)                        # killed inside the inner SNN
    p.wait()
    assert (out / "outer.pt").exists() and (out / "trusted.pt").exists()
    assert not (out / "results.json").exists()
    split = json.load(open(out / "split.json"))["labeled"]
    r = run_cli(*argv)
    assert "already holds a run" in r.stderr and r.returncode == 2       # no silent overwrite
    r = run_cli(*argv, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(out / "split.json"))["labeled"] == split
    rows = [(m["stage"], m["step"]) for m in map(json.loads, open(out / "metrics.jsonl"))]
    assert rows == [("outer", 20), ("outer", 40), ("inner", 20), ("inner", 40)]  # no step redone
    # batches are a pure function of (seed, step): the resumed run IS the uninterrupted one
    argv[-1] = str(tmp_path / "straight")
    assert run_cli(*argv).returncode == 0
    same = [(m["test_acc"], m["loss"]) for m in map(json.loads, open(tmp_path / "straight" / "metrics.jsonl"))]
    assert same == [(m["test_acc"], m["loss"]) for m in map(json.loads, open(out / "metrics.jsonl"))]
    res = _results(out)
    assert set(res) >= {"outer", "inner", "trusted", "test_acc", "test_acc_median20", "wall_s"}
    assert res["inner"]["test_acc"] == res["test_acc"]
    r = run_cli(*argv, "--resume", "--steps", "80")
    assert r.returncode == 2 and "--steps 80 differs" in r.stderr


def test_digits_end_to_end_fixmatch_kdfixmatch_and_suave_beat_the_supervised_floor(tmp_path):
    common = ["--labels", "30", "--steps", "500", "--eval-every", "100"]
    runs = {m: run_cli("--method", m, *common, "--out", str(tmp_path / m))
            for m in ("supervised", "kdfixmatch", "suave")}
    for m, r in runs.items():
        assert r.returncode == 0, (m, r.stderr[-2000:])
    floor, res = _results(tmp_path / "supervised")["test_acc"], _results(tmp_path / "kdfixmatch")
    fixmatch, kdfm, t = res["outer"]["test_acc"], res["inner"]["test_acc"], res["trusted"]
    suave = _results(tmp_path / "suave")["test_acc"]
    print(f"digits, 30 labels: supervised {floor:.3f} fixmatch {fixmatch:.3f} "
          f"kdfixmatch {kdfm:.3f} suave {suave:.3f}")
    assert min(fixmatch, kdfm, suave) >= floor + 0.05            # a clear margin (floor ~87%)
    assert 0 < t["trusted_size"] <= t["confident_size"] <= t["unlabeled"] == 1500
    assert t["trusted_precision"] >= t["outer_pseudo_label_precision"]     # the filter filters
    out = runs["kdfixmatch"].stdout
    assert "KD-FixMatch (inner SNN)" in out and "trusted subset" in out and "FixMatch (outer" in out


def test_cifar10_jpeg_copy_through_folder(tmp_path):
    if not CIFAR_JPEG.exists():
        pytest.skip(f"{CIFAR_JPEG} is not here (it is in CI)")
    keep = {"train": 300, "test": 10}                    # a slice: ImageFolder layout, real JPEGs
    with tarfile.open(CIFAR_JPEG) as tar:
        members = []
        counts = {}
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 4 and parts[1] in keep:
                key = parts[1:3]
                if counts.get(key, 0) < keep[parts[1]]:
                    counts[key] = counts.get(key, 0) + 1
                    members.append(m)
        tar.extractall(tmp_path, members=members, filter="data")
    root = tmp_path / "cifar10"
    args = kd.get_args(["--dataset", "folder", "--data-dir", str(root), "--workers", "0"])
    d = kd.load_dataset(args)
    assert d["train_x"].shape == (3000, 3, 32, 32) and d["classes"] == 10
    assert torch.bincount(d["train_y"]).tolist() == [300] * 10 and d["flip"]
    # decoding workers must not hold a file descriptor per image (the full copy once ran out)
    argv = ["--dataset", "folder", "--data-dir", str(root), "--labels", "100", "--arch",
            "small_cnn", "--steps", "4", "--batch-size", "8", "--mu", "2", "--workers", "2",
            "--method", "fixmatch", "--out", str(tmp_path / "run")]
    r = subprocess.run(["bash", "-c", 'ulimit -n 256 && exec "$@"', "-", sys.executable,
                        str(HERE / "kdfixmatch.py"), *argv], capture_output=True, text=True,
                       timeout=180, cwd=HERE)                # the old bug hung after the error
    assert r.returncode == 0, r.stderr[-2000:]
    assert _results(tmp_path / "run")["dataset"] == "folder"


# ---- reliability: bad input, records, faults
# Every fault ends in one line (exit 2, 130 for Ctrl-C) and loses nothing already written. Tiny
# in-process runs where a subprocess is not the point; torch is imported once per test process.
import errno  # noqa: E402
import shutil  # noqa: E402

from PIL import Image  # noqa: E402

_TINY = ["--labels", "20", "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--mu", "1",
         "--workers", "0", "--method", "fixmatch"]


def test_bad_flags_fail_before_torch_is_imported(tmp_path):
    r = subprocess.run([sys.executable, "-X", "importtime", str(HERE / "kdfixmatch.py"), "--lr", "-1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--lr -1.0: must be > 0" in r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.rstrip().endswith(("| torch", "| numpy"))]


def _img(path, mode, rows, **save):
    """An image file in `mode` with these pixel values (rows of pixels, a pixel a value or bands)."""
    a = np.array(rows, dtype={"F": "<f4", "I": "<i4", "I;16": "<u2"}.get(mode, "u1"))
    Image.frombytes(mode, a.shape[1::-1], a.tobytes()).save(path, **save)
    return str(path)


def test_decode_every_mode_to_the_right_rgb_pixels(tmp_path, monkeypatch):
    def rgb(path):
        x = kd._decode(path)
        assert not isinstance(x, str), x
        assert x.dtype == torch.uint8 and x.shape[0] == 3
        return x.permute(1, 2, 0).reshape(-1, 3).tolist()
    grey = lambda *vs: [[v] * 3 for v in vs]
    assert rgb(_img(tmp_path / "l.png", "L", [[0, 7, 200, 255]])) == grey(0, 7, 200, 255)
    im = Image.new("1", (2, 1))
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "1.png")
    assert rgb(str(tmp_path / "1.png")) == grey(0, 255)
    im = Image.new("P", (3, 1))                          # palette colours, transparency ignored
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    im.putdata([0, 1, 2])
    im.save(tmp_path / "p.png", transparency=1)
    assert rgb(str(tmp_path / "p.png")) == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    # alpha is dropped: the colour under it is kept, whatever the alpha
    assert rgb(_img(tmp_path / "rgba.png", "RGBA", [[[1, 2, 3, 0], [4, 5, 6, 128]]])) == [[1, 2, 3],
                                                                                         [4, 5, 6]]
    assert rgb(_img(tmp_path / "la.png", "LA", [[[9, 0], [99, 255]]])) == grey(9, 99)
    # 16 bits: round(v / 257), so an 8-bit value widened as v * 257 comes back exactly
    assert rgb(_img(tmp_path / "i16.png", "I;16", [[0, 257 * 100, 65535, 1000]])) == grey(0, 100, 255, 4)
    assert rgb(_img(tmp_path / "i32.tif", "I", [[0, 257 * 3, 65535]])) == grey(0, 3, 255)
    assert rgb(_img(tmp_path / "f.tif", "F", [[0.0, 0.5, 1.0, 0.1]])) == grey(0, 128, 255, 26)
    assert rgb(_img(tmp_path / "cmyk.tif", "CMYK", [[[0, 255, 255, 0], [0, 0, 0, 255]]])) == [
        [255, 0, 0], [0, 0, 0]]
    lab = rgb(_img(tmp_path / "lab.tif", "LAB", [[[255, 0, 0], [0, 0, 0]]]))   # a*, b* signed
    assert min(lab[0]) >= 250 and max(lab[1]) <= 5      # white and black
    ycc = rgb(_img(tmp_path / "ycc.tif", "YCbCr", [[[76, 85, 255]]]))[0]     # BT.601 red
    assert ycc[0] >= 250 and max(ycc[1:]) <= 3
    # modes PIL opens but cannot write (TIFF's associated alpha, HSV): from memory
    pa = Image.new("PA", (1, 1), (1, 7))
    pa.putpalette([5, 6, 7, 50, 60, 70])
    for im, want in ((Image.new("La", (1, 1), (100, 128)), grey(199)),       # un-premultiplied
                     (Image.new("RGBa", (1, 1), (100, 50, 20, 128)), [[199, 99, 39]]),
                     (Image.new("HSV", (1, 1), (0, 255, 255)), [[255, 0, 0]]), (pa, [[50, 60, 70]]),
                     (Image.new("I;16B", (1, 1), 257 * 9), grey(9))):
        monkeypatch.setattr(kd.PIL.Image, "open", lambda path, im=im: im)
        assert rgb("in-memory") == want, im.mode
    monkeypatch.undo()
    # out of range or unreadable: refused, the file named
    assert "outside [0, 1]" in kd._decode(_img(tmp_path / "f2.tif", "F", [[0.0, 2.0]]))
    assert "outside [0, 65535]" in kd._decode(_img(tmp_path / "i2.tif", "I", [[-1, 0]]))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    big = _img(tmp_path / "big.png", "L", np.random.default_rng(0).integers(0, 256, (64, 64)))
    (tmp_path / "cut.png").write_bytes(Path(big).read_bytes()[:300])     # truncated
    for f in ("empty.png", "junk.jpg", "cut.png"):
        msg = kd._decode(str(tmp_path / f))
        assert isinstance(msg, str) and msg.startswith(f"cannot decode {tmp_path / f} ("), msg


def _folder(root, sizes, classes=("a", "b"), per=3):
    for split, size in sizes.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per):
                Image.new("RGB", (size, size), (i, 0, 0)).save(root / split / c / f"{i}.png")
    return str(root)


def _folder_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        kd.load_dataset(kd.get_args(["--dataset", "folder", *argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_folder_refuses_bad_files_sizes_and_classes_in_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "d", {"train": 8, "test": 6})
    err = _folder_error(["--data-dir", root, "--workers", "0"], capsys)
    assert "images differ in size [(6, 6), (8, 8)]; pass --image-size N" in err
    d = kd.load_dataset(kd.get_args(["--dataset", "folder", "--data-dir", root, "--image-size", "4",
                                     "--workers", "0"]))
    assert d["train_x"].shape == (6, 3, 4, 4) and d["test_x"].shape == (6, 3, 4, 4)
    bad = tmp_path / "d" / "test" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])              # truncated, found by a decoding worker
    err = _folder_error(["--data-dir", root, "--image-size", "4", "--workers", "1"], capsys)
    assert f"cannot decode {bad} (" in err
    one = _folder(tmp_path / "one", {"train": 8, "test": 8}, classes=("a",))
    err = _folder_error(["--data-dir", one, "--workers", "0"], capsys)
    assert "at least 2 (they hold 1 and 1; in one only: [])" in err
    other = _folder(tmp_path / "other", {"train": 8, "test": 8})
    (tmp_path / "other" / "test" / "b").rename(tmp_path / "other" / "test" / "c")
    err = _folder_error(["--data-dir", other, "--workers", "0"], capsys)
    assert "in one only: ['b', 'c']" in err
    empty = _folder(tmp_path / "e", {"train": 8, "test": 8})
    for f in (tmp_path / "e" / "train" / "b").iterdir():
        f.unlink()
    err = _folder_error(["--data-dir", empty, "--workers", "0"], capsys)
    assert "Found no valid file for the classes b" in err


def test_image_size_resizes_digits():
    d = kd.load_dataset(kd.get_args(["--image-size", "16"]))
    assert d["train_x"].shape[1:] == (1, 16, 16) and d["test_x"].shape[1:] == (1, 16, 16)


def test_split_records_its_data_and_refuses_other_data(tmp_path, capsys):
    args = kd.get_args(["--out", str(tmp_path), "--labels", "20"])
    args.t0 = time.time()
    data = dict(train_y=torch.arange(10).repeat(30), classes=10)
    split = kd.prepare_out(args, data)
    s = json.load(open(tmp_path / "split.json"))
    assert s["train_images"] == 300 and len(s["train_labels_sha256"]) == 64
    assert s["dataset"] == "digits" and s["labeled"] == split.tolist()
    args.resume = True
    assert torch.equal(kd.prepare_out(args, data), split)          # the same data: reused
    data["train_y"] = data["train_y"].roll(1)                        # same size, other labels
    with pytest.raises(SystemExit) as e:
        kd.prepare_out(args, data)
    assert e.value.code == 2 and "records train_labels_sha256" in capsys.readouterr().err
    (tmp_path / "outer.pt").touch()
    other = kd.get_args(["--out", str(tmp_path / "kd"), "--labels", "20", "--outer-from", str(tmp_path)])
    other.t0 = time.time()
    with pytest.raises(SystemExit):                                  # --outer-from: the same check
        kd.prepare_out(other, dict(train_y=torch.arange(10).repeat(31), classes=10))
    assert "records train_images 300" in capsys.readouterr().err


def test_resume_keeps_the_runs_flags(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "outer.pt").touch()
    stored = vars(kd.get_args(["--out", str(out), "--method", "kdfixmatch", "--outer-from",
                               str(tmp_path), "--tau-inner", "0.9", "--lr", "0.05"]))
    (out / "config.json").write_text(json.dumps(stored))
    args = kd.get_args(["--out", str(out), "--resume", "--workers", "1"])   # nothing re-asked
    assert (args.outer_from, args.tau_inner, args.lr, args.workers) == (str(tmp_path), 0.9, 0.05, 1)
    for flag, v in (("--lr", "0.03"), ("--tau", "0.9"), ("--steps", "600"), ("--loss", "sce")):
        with pytest.raises(SystemExit) as e:
            kd.get_args(["--out", str(out), "--resume", flag, v])
        assert e.value.code == 2 and f"--resume: {flag} " in capsys.readouterr().err
    kd.get_args(["--out", str(out), "--resume", "--lr", "0.05", "--device", "cpu"])  # the same: fine


def test_metrics_survive_a_cut_line_and_refuse_nan(tmp_path):
    args = kd.get_args(["--out", str(tmp_path)])
    args.t0 = time.time() - 5
    kd.log_metrics(args, dict(stage="outer", step=2, loss=1.0))
    kd.log_metrics(args, dict(stage="outer", step=4, loss=0.5))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "outer", "st')                    # a power loss mid-line
    assert [r["step"] for r in kd._metrics(args)] == [2, 4]
    kd.trim_metrics(args, "outer", 2)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert kd._metrics(args)[0]["wall_s"] >= 5
    before = (tmp_path / "metrics.jsonl").read_bytes()
    for row in (dict(stage="outer", step=6, loss=float("nan")), dict(test_acc=float("inf"))):
        with pytest.raises(SystemExit):                     # strict JSON: never a NaN number
            kd.log_metrics(args, row)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("name", ["results.json", "ckpt_outer.pt"])
def test_full_disk_names_the_file_and_keeps_the_old_one(name, tmp_path, capsys):
    path = tmp_path / name
    kd.save(str(path), {"old": 1} if name.endswith(".json") else {"w": torch.zeros(3)})
    before = path.read_bytes()
    os.symlink("/dev/full", str(path) + ".tmp")              # writes there fail with ENOSPC
    with pytest.raises(SystemExit) as e:
        kd.save(str(path), {"new": 2} if name.endswith(".json") else {"w": torch.ones(10 ** 5)})
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot write {path} (" in err and len(err.splitlines()) == 1
    assert os.strerror(errno.ENOSPC) in err
    assert path.read_bytes() == before and not os.path.lexists(str(path) + ".tmp")


def test_one_writer_per_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "f.write('4242'); f.flush(); print('held', flush=True); time.sleep(60)"), str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as e:
            kd.main([*_TINY, "--out", str(out)])
        assert e.value.code == 2 and "in use by process 4242" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    res = kd.main([*_TINY, "--out", str(out)])              # its lock died with it: not stale
    assert res["steps"] == 4 and (out / ".lock").read_text() == str(os.getpid())


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit):                          # found after split.json was written
        kd.main([*_TINY, "--arch", "efficientnet_b0", "--out", out])
    assert "3-channel" in capsys.readouterr().err and os.path.exists(os.path.join(out, "split.json"))
    assert kd.main([*_TINY, "--out", out])["arch"] == "small_cnn"


def test_ctrl_c_then_resume_and_finished_runs_stay_as_they_are(tmp_path):
    out = tmp_path / "run"
    argv = [*_TINY, "--steps", "400", "--eval-every", "10", "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(HERE / "kdfixmatch.py"), *argv], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt_outer.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    ours = [ln for ln in err.replace("\r", "\n").splitlines() if "kdfixmatch.py:" in ln]
    assert ours == [f"kdfixmatch.py: interrupted; resume with: python {HERE / 'kdfixmatch.py'} "
                    f"--out {out} --resume"]             # (the progress bar may redraw after it)
    wall = max(r["wall_s"] for r in map(json.loads, open(out / "metrics.jsonl")))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "outer", "step"')                 # and a line cut short
    assert run_cli("--out", str(out), "--resume", "--lr", "0.1").returncode == 2
    config = (out / "config.json").read_bytes()
    r = run_cli("--out", str(out), "--resume")              # the printed command, flags restored
    assert r.returncode == 0, r.stderr[-2000:]
    res, rows = _results(out), list(map(json.loads, open(out / "metrics.jsonl")))
    assert res["steps"] == 400 and [r["step"] for r in rows] == list(range(10, 401, 10))
    assert res["wall_s"] > wall and rows[-1]["wall_s"] > wall   # the pieces add up
    assert (out / "config.json").read_bytes() == config
    before = {f: (out / f).read_bytes() for f in ("results.json", "config.json")}
    r = run_cli("--out", str(out), "--resume")
    assert r.returncode == 0 and "is complete" in r.stdout
    assert before == {f: (out / f).read_bytes() for f in before}


@pytest.mark.skipif(not shutil.which("setsid") or not os.path.isdir("/proc/self"),
                    reason="needs setsid and /proc (Linux)")
def test_run_all_sigterm_without_a_terminal_stops_its_cells(tmp_path):
    out = str(tmp_path / "ra")
    e = {k: v for k, v in os.environ.items() if k not in _RUN_ALL_ENV}
    e.update(PYTHON=sys.executable, OUT_DIR=out, LABELS="50", SEEDS="1", STEPS="5000",
             EVAL_EVERY="1000")
    ra = subprocess.Popen(["setsid", "bash", _RUN_ALL, "--smoke"], env=e, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    cells = lambda: [p for p in os.listdir("/proc") if p.isdigit() and out in _cmdline(p)]
    deadline = time.time() + 120
    while len(cells()) < 3 and time.time() < deadline:   # a cell's python and its 2 workers
        time.sleep(0.2)
    assert len(cells()) >= 3
    ra.send_signal(signal.SIGTERM)
    assert ra.wait(timeout=60) == 130
    time.sleep(0.5)
    assert not [_cmdline(p) for p in cells()]


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


# ---- kernels.py: Triton kernels against the PyTorch references (TRITON_INTERPRET=1 on CPU)
# The Triton implementations are called directly; without a GPU they run on CPU tensors in the
# interpreter (TRITON_INTERPRET is set at the top of this file), with a GPU on CUDA tensors.
import types  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402

_needs_triton = pytest.mark.skipif(not kernels._HAS_TRITON, reason="triton does not import")
_DEV = "cuda" if torch.cuda.is_available() else "cpu"
# loss/grad tolerances per logits dtype: both paths compute in fp32 from the same rounded inputs;
# low-precision dtypes differ by the rounding of the gradient written in that dtype
_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float16: dict(atol=1e-4, rtol=2e-3),
        torch.bfloat16: dict(atol=1e-3, rtol=1e-2)}


def _pl_both(weak, strong, tau, trusted=None, loss="ce", alpha=0.1, beta=1.0, A=-4.0, **kw):
    """(loss, mask, labels, d loss / d strong) from the Triton kernel and from the reference."""
    out = []
    for f, fkw in ((kernels._masked_pseudo_label_loss_triton, kw),
                   (kernels.masked_pseudo_label_loss_torch, {})):
        s = strong.detach().clone().requires_grad_()
        l, m, y = f(weak, s, tau, trusted, loss, alpha, beta, A, **fkw)
        (g,) = torch.autograd.grad(l, s)
        out.append((l.detach(), m, y, g))
    return out


def _assert_pl_match(kern, ref, dtype=torch.float32):
    l, m, y, g = kern
    lr, mr, yr, gr = ref
    assert m.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(m, mr) and torch.equal(y, yr)
    assert torch.isfinite(l) and not torch.isnan(g).any()
    torch.testing.assert_close(l, lr, **_TOL[torch.float32])
    assert g.dtype == gr.dtype
    torch.testing.assert_close(g.float(), gr.float(), atol=_TOL[dtype]["atol"] / len(g),
                               rtol=_TOL[dtype]["rtol"])


def _logits(B, C, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, C, generator=gen)).to(dtype).to(_DEV)


def _trusted(B, C, seed=0):
    # outer labels with -1 (not trusted) on about half of the rows
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=gen)
    return torch.where(torch.rand(B, generator=gen) < 0.5, -1, labels).to(_DEV)


def _split_tau(weak):
    # threshold halfway between the two middle row confidences: about half the rows confident,
    # and no confidence within rounding of tau
    conf = weak.float().softmax(-1).max(-1).values.sort().values
    k = (len(conf) - 1) // 2
    return conf[0].item() / 2 if len(conf) == 1 else (conf[k] + conf[k + 1]).item() / 2


def test_pl_loss_reference_gradcheck():
    # the reference computes in float32 by design (.float()), so float64 inputs get fp32-sized
    # finite differences and tolerances
    weak, strong = _logits(6, 5, torch.float64), _logits(6, 5, torch.float64, seed=1)
    trusted = torch.tensor([-1, 2, -1, 0, 4, -1], device=_DEV)
    strong.requires_grad_()
    for loss in ("ce", "sce"):
        f = lambda s: kernels.masked_pseudo_label_loss_torch(  # noqa: E731
            weak, s, 0.9, trusted, loss, 0.3, 0.7, -2.0)[0]
        mask = kernels.masked_pseudo_label_loss_torch(weak, strong, 0.9, trusted)[1]
        assert mask.tolist() == [1, 1, 0, 1, 1, 1]  # 2 confident, 3 trusted, 1 masked
        assert torch.autograd.gradcheck(f, (strong,), eps=1e-2, atol=1e-4, rtol=1e-3)


@_needs_triton
@pytest.mark.parametrize("B,C,max_block_c", [
    (1, 2, 2048), (13, 2, 2048), (16, 10, 2048), (37, 101, 2048), (5, 1000, 2048),
    (9, 101, 32),     # C over several column blocks: online max / sum-exp, two passes
    (3, 2500, 2048),  # C wider than the real block limit
])
@pytest.mark.parametrize("loss", ["ce", "sce"])
@pytest.mark.parametrize("with_trusted", [False, True])
def test_pl_loss_kernel_matches_reference(B, C, max_block_c, loss, with_trusted):
    weak, strong = _logits(B, C, seed=B + C), _logits(B, C, seed=B * C)
    trusted = _trusted(B, C, seed=C) if with_trusted else None
    kern, ref = _pl_both(weak, strong, _split_tau(weak), trusted, loss, 0.3, 0.7, -2.0,
                         max_block_c=max_block_c)
    assert ref[1].sum() > 0
    if B > 1 and not with_trusted:  # about half the rows masked
        assert ref[1].sum() < B
    _assert_pl_match(kern, ref)


@_needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,C,max_block_c", [(33, 10, 2048), (7, 101, 2048), (5, 101, 32)])
def test_pl_loss_kernel_low_precision(dtype, B, C, max_block_c):
    weak, strong = _logits(B, C, dtype, seed=1), _logits(B, C, dtype, seed=2)
    kern, ref = _pl_both(weak, strong, _split_tau(weak), _trusted(B, C), "sce",
                         max_block_c=max_block_c)
    _assert_pl_match(kern, ref, dtype)


@_needs_triton
@pytest.mark.parametrize("max_block_c", [2048, 16])
def test_pl_loss_kernel_argmax_ties_first_index(max_block_c):
    C = 40
    weak = torch.zeros(4, C, device=_DEV)
    weak[0, [3, 7]] = 5.0    # tie inside one block
    weak[1, [5, 33]] = 5.0   # tie across column blocks when max_block_c=16
    weak[2, [39, 0]] = 5.0   # the first index wins even when it is column 0
    # row 3: all equal: conf = 1/C, label 0
    strong = _logits(4, C, seed=3)
    kern, ref = _pl_both(weak, strong, 0.0, max_block_c=max_block_c)
    assert ref[2].tolist() == [3, 5, 0, 0]
    _assert_pl_match(kern, ref)


@_needs_triton
@pytest.mark.parametrize("max_block_c", [2048, 16])
def test_pl_loss_kernel_all_and_no_rows_masked(max_block_c):
    weak, strong = _logits(20, 50), _logits(20, 50, seed=1)
    for trusted in (None, torch.full((20,), -1, device=_DEV)):  # nothing confident: all masked
        kern, ref = _pl_both(weak, strong, 1.01, trusted, "sce", max_block_c=max_block_c)
        _assert_pl_match(kern, ref)
        assert kern[0].item() == 0.0 and kern[1].sum() == 0 and not kern[3].any()
    kern, ref = _pl_both(weak, strong, 0.0, None, max_block_c=max_block_c)  # all confident
    _assert_pl_match(kern, ref)
    assert kern[1].sum() == 20
    trusted = torch.arange(20, device=_DEV) % 50  # all rows kept via trusted labels
    kern, ref = _pl_both(weak, strong, 1.01, trusted, max_block_c=max_block_c)
    _assert_pl_match(kern, ref)
    assert kern[1].sum() == 20 and torch.equal(kern[2], trusted)


@_needs_triton
def test_pl_loss_kernel_is_supervised_ce_with_labels_and_tau_above_one():
    logits, labels = _logits(24, 10), torch.randint(0, 10, (24,)).to(_DEV)
    kern, _ = _pl_both(logits, logits, 2.0, labels)
    s = logits.clone().requires_grad_()
    ce = F.cross_entropy(s, labels)
    (g,) = torch.autograd.grad(ce, s)
    torch.testing.assert_close(kern[0], ce.detach())
    torch.testing.assert_close(kern[3], g)


@_needs_triton
@pytest.mark.parametrize("max_block_c", [2048, 16])
# the interpreter's numpy warns on the inf - inf / log(0) of masked rows, which where() discards
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_pl_loss_kernel_inf_and_huge_logits(max_block_c):
    B, C, ninf = 6, 40, float("-inf")
    weak, strong = _logits(B, C), _logits(B, C, seed=1)
    weak[0, 0], strong[0, 1:] = 1e4, -1e4  # confident on 0; huge strong logits
    weak[1, :], weak[1, 2] = -1e4, 1e4     # confident on 2 ...
    strong[1, :20], strong[1, 2] = ninf, 0.0  # ... -inf strong logits beside the target
    weak[2, :17], weak[2, 30] = ninf, 20.0    # -inf weak logits over a whole column block
    weak[3:6] = 0.0                           # rows 3-5: unconfident
    strong[3, :] = ninf                       # masked (trusted -1): its CE would be NaN
    strong[4, 0] = ninf                       # masked, target 0 (argmax of a flat row): CE inf
    strong[5, :], strong[5, 7] = 1e4, -1e4    # kept by trusted label 7: CE about 2e4
    trusted = torch.tensor([-1, -1, -1, -1, -1, 7], device=_DEV)
    for loss in ("ce", "sce"):
        kern, ref = _pl_both(weak, strong, 0.99, trusted, loss, max_block_c=max_block_c)
        assert kern[1].tolist() == [1, 1, 1, 0, 0, 1]
        assert not kern[3][3:5].any()
        # the reference's log_softmax backward is NaN on the all -inf row 3 although it is masked
        # (0 * NaN); the kernel gives the 0 a masked row must get
        assert ref[3][3].isnan().all()
        ref[3][3] = 0.0
        _assert_pl_match(kern, ref)


@_needs_triton
@pytest.mark.parametrize("max_block_c", [2048, 16])
def test_pl_loss_kernel_non_contiguous_inputs(max_block_c):
    B, C = 12, 37
    weak = _logits(B, 2 * C)[:, ::2]             # column stride 2
    strong = _logits(C, B, seed=1).t()           # transposed: row stride 1
    trusted = _trusted(2 * B, C)[::2]            # strided labels
    assert not weak.is_contiguous() and not strong.is_contiguous()
    kern, ref = _pl_both(weak, strong, _split_tau(weak), trusted, "sce",
                         max_block_c=max_block_c)
    _assert_pl_match(kern, ref)


@_needs_triton
def test_pl_loss_kernel_grad_output_scaling_and_no_grad():
    weak, strong = _logits(10, 10), _logits(10, 10, seed=1).requires_grad_()
    l, _, _ = kernels._masked_pseudo_label_loss_triton(weak, strong, 0.6)
    (g3,) = torch.autograd.grad(3.0 * l, strong)
    (_, _, _, g), _ = _pl_both(weak, strong, 0.6)
    torch.testing.assert_close(g3, 3 * g)
    with torch.no_grad():  # no gradient buffer written; same values
        l2, m2, y2 = kernels._masked_pseudo_label_loss_triton(weak, strong, 0.6)
    lr, mr, yr = kernels.masked_pseudo_label_loss_torch(weak, strong, 0.6)
    torch.testing.assert_close(l2, lr.detach())
    assert torch.equal(m2, mr) and torch.equal(y2, yr)


def _dec_run(f, z, mu, alpha=1.0, **kw):
    """(q, d<q,g>/dz, d<q,g>/dmu) of f for a fixed random upstream gradient g."""
    g = torch.randn(z.shape[0], mu.shape[0], generator=torch.Generator().manual_seed(7))
    zz, mm = z.detach().clone().requires_grad_(), mu.detach().clone().requires_grad_()
    q = f(zz, mm, alpha, **kw)
    return (q.detach(), *torch.autograd.grad(q, (zz, mm), g.to(q)))


def _dec_both(z, mu, alpha=1.0, **kw):
    return (_dec_run(kernels._dec_soft_assign_triton, z, mu, alpha, **kw),
            _dec_run(kernels.dec_soft_assign_torch, z, mu, alpha))


def test_dec_reference_gradcheck():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for alpha in (1.0, 2.5):
        assert torch.autograd.gradcheck(lambda a, b: kernels.dec_soft_assign_torch(a, b, alpha),
                                        (z, mu))


@_needs_triton
@pytest.mark.parametrize("N,K,D,max_block_k", [
    (1, 2, 3, 128), (64, 10, 16, 128), (100, 37, 70, 128),
    (90, 37, 70, 16),  # K over several tiles: unnormalised write, then rescale
    (50, 200, 33, 128), (20, 1000, 40, 128),  # K wider than the real tile limit
])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_dec_kernel_matches_reference(N, K, D, max_block_k, alpha):
    gen = torch.Generator().manual_seed(N + K + D)
    z = torch.randn(N, D, generator=gen).to(_DEV)
    mu = torch.randn(K, D, generator=gen).to(_DEV)
    (q, gz, gm), (qr, gzr, gmr) = _dec_both(z, mu, alpha, max_block_k=max_block_k)
    torch.testing.assert_close(q.sum(1), torch.ones(N, device=_DEV))
    torch.testing.assert_close(q, qr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gz, gzr, atol=1e-6 * gzr.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(gm, gmr, atol=1e-6 * gmr.abs().max().item(), rtol=1e-5)


@_needs_triton
def test_dec_kernel_non_contiguous_large_offsets_and_points_on_centroids():
    gen = torch.Generator().manual_seed(1)
    # far from the origin, d2 = |z|^2 + |mu|^2 - 2 z.mu is a difference of large numbers
    z = (50 + torch.randn(40, 60, generator=gen)).to(_DEV)[:, ::2]  # column stride 2
    mu = (50 + torch.randn(5, 30, generator=gen)).to(_DEV)
    z[:5] = mu  # points on the centroids: d2 ~ 0, clamped where rounding makes it negative
    assert not z.is_contiguous()
    kern, ref = _dec_both(z, mu)
    truth = _dec_run(kernels.dec_soft_assign_torch, z.double(), mu.double())
    assert not any(torch.isnan(t).any() for t in kern)
    # fp32 cancellation costs both paths accuracy here: the kernel must be as accurate as the
    # fp32 reference, measured against the float64 reference
    for k, r, t in zip(kern, ref, truth):
        assert (k.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-7


@_needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dec_kernel_low_precision(dtype):
    gen = torch.Generator().manual_seed(2)
    z, mu = torch.randn(70, 20, generator=gen), torch.randn(12, 20, generator=gen)
    z, mu = z.to(dtype).to(_DEV), mu.to(dtype).to(_DEV)
    (q, gz, gm), (qr, gzr, gmr) = _dec_both(z.float(), mu.float())  # fp32 on rounded inputs
    (qk, gzk, gmk), _ = _dec_both(z, mu)
    assert qk.dtype == gzk.dtype == gmk.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(qk.float(), qr, atol=4 * eps, rtol=4 * eps)
    torch.testing.assert_close(gzk.float(), gzr, atol=4 * eps * gzr.abs().max().item(),
                               rtol=4 * eps)
    torch.testing.assert_close(gmk.float(), gmr, atol=4 * eps * gmr.abs().max().item(),
                               rtol=4 * eps)


@_needs_triton
def test_dec_kernel_grad_for_z_only():
    z = torch.randn(30, 8, device=_DEV, requires_grad=True)
    mu = torch.randn(4, 8, device=_DEV)
    q = kernels._dec_soft_assign_triton(z, mu)
    (gz,) = torch.autograd.grad(q[:, 0].sum(), z)
    (gzr,) = torch.autograd.grad(kernels.dec_soft_assign_torch(z, mu)[:, 0].sum(), z)
    torch.testing.assert_close(gz, gzr, atol=1e-7, rtol=1e-5)


def test_dispatch_cpu_and_kill_switch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path taken")
    monkeypatch.setattr(kernels, "_masked_pseudo_label_loss_triton", boom)
    monkeypatch.setattr(kernels, "_dec_soft_assign_triton", boom)
    weak, strong, trusted = _logits(8, 5).cpu(), _logits(8, 5, seed=1).cpu(), _trusted(8, 5).cpu()
    got = kernels.masked_pseudo_label_loss(weak, strong, 0.6, trusted, "sce")
    want = kernels.masked_pseudo_label_loss_torch(weak, strong, 0.6, trusted, "sce")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    z, mu = torch.randn(9, 4), torch.randn(3, 4)
    assert torch.equal(kernels.dec_soft_assign(z, mu, 2.0),
                       kernels.dec_soft_assign_torch(z, mu, 2.0))
    with pytest.raises(ValueError):
        kernels.masked_pseudo_label_loss(weak, strong, 0.6, loss="mse")
    # CUDA tensors take the Triton path unless KDFM_NO_TRITON=1
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("KDFM_NO_TRITON", raising=False)
    assert kernels._use_triton(cuda_like) == kernels._HAS_TRITON
    assert not kernels._use_triton(types.SimpleNamespace(is_cuda=False))
    monkeypatch.setenv("KDFM_NO_TRITON", "1")
    assert not kernels._use_triton(cuda_like)
# ---- end of kernels.py tests


# ---- run_all.sh: the table step and the smoke run
# run_all.sh runs kdfixmatch.py once per (dataset, labels, method, seed) cell and summarises the
# cells' results.json into table.md / table.png. The table tests fabricate results.json files, so
# every number in table.md is known; the smoke test trains 4 tiny digits cells on CPU (~1 minute).
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_RUN_ALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_all.sh")
_RUN_ALL_ENV = ("DATASETS", "LABELS", "SEEDS", "STEPS", "EVAL_EVERY", "ARCH", "PRETRAINED",
                "DATA_DIR", "OUT_DIR", "GPUS")


def _run_all(*args, timeout=600, **env):
    e = {k: v for k, v in os.environ.items() if k not in _RUN_ALL_ENV}   # only what we pass
    e.update(PYTHON=sys.executable, **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", _RUN_ALL, *args], env=e, capture_output=True, text=True,
                          timeout=timeout)


def _fake_cell(out, dataset, labels, method, seed, acc=None, wall_s=3600.0, trusted=None):
    """A cell directory as kdfixmatch.py leaves it: split.json, and results.json once finished."""
    d = os.path.join(out, dataset, str(labels), method, f"seed{seed}")
    os.makedirs(d)
    json.dump(dict(dataset=dataset, labels=labels, seed=seed, arch="efficientnet_b0", labeled=[]),
              open(os.path.join(d, "split.json"), "w"))
    if acc is not None:
        res = dict(method="kdfixmatch" if method.startswith("kd") else "fixmatch",
                   dataset=dataset, labels=labels, seed=seed, arch="efficientnet_b0",
                   steps=2 ** 21 if method == "fixmatch-2x" else 2 ** 20, test_acc=acc,
                   test_acc_median20=acc, wall_s=wall_s)
        if trusted:
            res["trusted"] = dict(unlabeled=50000, trusted_size=trusted[0],
                                  trusted_precision=trusted[1])
        json.dump(res, open(os.path.join(d, "results.json"), "w"), indent=2)
    return d


def _fake_results(out):
    """cifar10 4000: 3 seeds of FixMatch and KD (CE), 1 seed of KD (SCE), no FixMatch 2x.
    cifar10 400: 1 seed of FixMatch, KD (CE) seed 0 started. svhn: unavailable offline."""
    for s, (fm, ce) in enumerate([(0.90, 0.93), (0.91, 0.92), (0.92, 0.95)]):
        _fake_cell(out, "cifar10", 4000, "fixmatch", s, fm)
        _fake_cell(out, "cifar10", 4000, "kd-ce", s, ce, wall_s=7200.0,
                   trusted=(40000 + 1000 * s, 0.97 + 0.01 * s))
    _fake_cell(out, "cifar10", 4000, "kd-sce", 0, 0.94, wall_s=7200.0, trusted=(40000, 0.97))
    _fake_cell(out, "cifar10", 400, "fixmatch", 0, 0.50)
    _fake_cell(out, "cifar10", 400, "kd-ce", 0)                      # started, not finished
    d = os.path.join(out, "svhn", "400", "fixmatch", "seed0")
    os.makedirs(d)
    with open(os.path.join(d, "unavailable"), "w") as f:
        f.write("kdfixmatch.py: error: --dataset svhn: not found in /data and the download failed\n")


def _table_rows(path):
    """table.md -> {(dataset, labels): [the remaining columns]}"""
    rows = {}
    for line in open(path):
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cols[0] not in ("dataset",):
            rows[cols[0], cols[1]] = cols[2:]
    return rows


def test_run_all_table_from_fabricated_results(tmp_path):
    out = str(tmp_path / "results")
    _fake_results(out)
    r = _run_all("--table", "--datasets", "cifar10 svhn", "--labels", "400 4000", "--seeds", "3",
                 OUT_DIR=out)
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(out, "table.md")).read()
    rows = _table_rows(os.path.join(out, "table.md"))
    assert set(rows) == {("cifar10", "400"), ("cifar10", "4000"), ("svhn", "all")}
    fm, ce, sce, fm2, ce_fm, sce_fm, ce_fm2, paper, size, prec, wall = rows["cifar10", "4000"]
    assert fm == "91.00 ± 1.00 (n=3)"                   # 90, 91, 92: sample std 1
    assert ce == "93.33 ± 1.53 (n=3)"                   # 93, 92, 95
    assert sce == "94.00 (n=1)"                         # a single seed: no std
    assert fm2 == "–"                                   # missing cell
    assert ce_fm == "+2.33 ± 1.15 (n=3)"                # per-seed differences 3, 1, 3
    assert sce_fm == "+4.00 (n=1)" and ce_fm2 == "–"
    assert paper == "+2.44"                             # the paper's CIFAR10 gain at 4000 labels
    assert size == "41000 / 50000" and prec == "98.00 ± 1.00 (n=3)"
    assert wall == "FM 60 min, CE 3.0 h, SCE 3.0 h, 2x –"   # KD includes its reused outer SNN
    fm, ce, *_, paper, size, prec, wall = rows["cifar10", "400"]
    assert (fm, ce, paper, size) == ("50.00 (n=1)", "running", "unknown", "–")
    assert rows["svhn", "all"][0].startswith("unavailable offline: --dataset svhn: not found")
    assert "K = 1048576 steps per SNN" in text and "arch efficientnet_b0" in text
    try:
        import matplotlib  # noqa: F401
        assert os.path.exists(os.path.join(out, "table.png"))
    except ImportError:
        assert "matplotlib is not installed" in text


def test_run_all_suave_column_only_when_asked_or_present(tmp_path):
    out = str(tmp_path / "results")
    _fake_results(out)
    args = ("--table", "--datasets", "cifar10", "--labels", "4000", "--seeds", "3")
    assert _run_all(*args, OUT_DIR=out).returncode == 0
    assert "Suave" not in open(os.path.join(out, "table.md")).read()     # off by default
    assert _run_all(*args, "--suave", OUT_DIR=out).returncode == 0
    assert _table_rows(os.path.join(out, "table.md"))["cifar10", "4000"][4] == "–"
    for s, acc in enumerate((0.96, 0.94)):
        _fake_cell(out, "cifar10", 4000, "suave", s, acc)
    assert _run_all(*args, OUT_DIR=out).returncode == 0                  # found on disk: shown
    row = _table_rows(os.path.join(out, "table.md"))["cifar10", "4000"]
    assert row[4] == "95.00 ± 1.41 (n=2)" and row[-1].endswith("Suave 60 min")
    r = _run_all("--print-commands", "--suave", "--datasets", "cifar10", "--labels", "4000",
                 "--seeds", "3", OUT_DIR=out)
    assert sum("--method suave" in line for line in r.stdout.splitlines()) == 1   # seed 2 only


def test_run_all_table_without_matplotlib(tmp_path):
    out = str(tmp_path / "results")
    _fake_results(out)
    shim = tmp_path / "shim" / "matplotlib"             # `import matplotlib` fails as if absent
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no matplotlib (test shim)')\n")
    open(os.path.join(out, "table.png"), "w").close()    # a stale plot must not survive
    r = _run_all("--table", "--datasets", "cifar10 svhn", "--labels", "400 4000", "--seeds", "3",
                 OUT_DIR=out, PYTHONPATH=str(tmp_path / "shim"))
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(out, "table.md")).read()
    assert _table_rows(os.path.join(out, "table.md"))["cifar10", "4000"][0] == "91.00 ± 1.00 (n=3)"
    assert "table.png not written: matplotlib is not installed" in text
    assert "matplotlib is not installed" in r.stdout + r.stderr
    assert not os.path.exists(os.path.join(out, "table.png"))


def test_run_all_print_commands(tmp_path):
    out = str(tmp_path / "results")
    _fake_results(out)
    r = _run_all("--print-commands", "--datasets", "cifar10", "--labels", "400 4000",
                 "--seeds", "3", OUT_DIR=out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    outs = [os.path.relpath(re.search(r" --out (\S+)", ln).group(1), out) for ln in lines]
    cell = lambda l, m, s: f"cifar10/{l}/{m}/seed{s}"
    phase1 = [cell(400, "fixmatch", 1), cell(400, "fixmatch-2x", 0), cell(400, "fixmatch", 2),
              cell(400, "fixmatch-2x", 1), cell(400, "fixmatch-2x", 2)] + \
             [cell(4000, "fixmatch-2x", s) for s in range(3)]
    phase2 = [cell(400, "kd-ce", 0), cell(400, "kd-sce", 0), cell(4000, "kd-sce", 1),
              cell(4000, "kd-sce", 2)]                  # their fixmatch (outer) cell has finished
    assert sorted(outs[:8]) == sorted(phase1) and sorted(outs[8:]) == sorted(phase2)
    assert len(lines) == 12                             # finished cells print nothing
    assert "4 KD cells wait for their fixmatch cell" in r.stderr   # 400 labels, seeds 1 and 2
    for ln, o in zip(lines, outs):
        assert ln.count(sys.executable) == 1 and "kdfixmatch.py" in ln and "--pretrained" in ln
        assert ("--steps 2097152" in ln) == ("fixmatch-2x" in o)
        if "/kd-" in o:
            assert f"--outer-from {os.path.join(out, o.replace(o.split('/')[2], 'fixmatch'))}" in ln
            assert f"--loss {o.split('/')[2][3:]}" in ln
        assert "split.json && echo --resume" in ln      # decided when it runs: requeue-safe


def test_run_all_bad_options():
    for args in (["--bogus"], ["--seeds", "x"], ["--steps"], ["--datasets", "cifar11"]):
        r = _run_all(*args, "--table")
        assert r.returncode == 2 and r.stdout == "", args
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("run_all.sh: error:")
    r = _run_all("--help")
    assert r.returncode == 0
    for opt in ("--datasets", "--labels", "--seeds", "--steps", "--eval-every", "--arch",
                "--no-pretrained", "--data-dir", "--out-dir", "--gpus", "--smoke",
                "--print-commands", "--table", "PYTHON", "Cost"):
        assert opt in r.stdout, opt


def test_run_all_smoke_end_to_end_and_skip(tmp_path):
    """--smoke, cut to 1 label count x 1 seed x 40 steps: 4 cells trained, the table written; a
    second invocation skips them all; a printed command re-creates a removed results.json."""
    out = str(tmp_path / "smoke")
    env = dict(OUT_DIR=out, LABELS=50, SEEDS=1, STEPS=40, EVAL_EVERY=20)
    r = _run_all("--smoke", **env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    methods = ("fixmatch", "kd-ce", "kd-sce", "fixmatch-2x")
    for m in methods:
        res = json.load(open(os.path.join(out, "digits", "50", m, "seed0", "results.json")))
        assert res["steps"] == (80 if m == "fixmatch-2x" else 40) and res["arch"] == "small_cnn"
    assert len(re.findall(r"\.\.\. done \d+\.\d\d%", r.stdout)) == 4
    rows = _table_rows(os.path.join(out, "table.md"))
    assert list(rows) == [("digits", "50")]
    cols = rows["digits", "50"]
    for c in cols[:7]:                                  # 4 accuracies, 3 differences
        assert re.fullmatch(r"[+-]?\d+\.\d\d \(n=1\)", c), cols
    assert cols[7] == "n/a" and re.fullmatch(r"\d+ / 1500", cols[8])
    assert os.path.getsize(os.path.join(out, "table.png")) > 0

    t0 = time.time()
    r = _run_all("--smoke", **env)                      # everything finished: nothing to train
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("skip (finished)") == 4 and "... start" not in r.stdout
    assert "4 done, 0 to go" in r.stdout and time.time() - t0 < 30

    assert _run_all("--smoke", "--print-commands", **env).stdout == ""
    os.remove(os.path.join(out, "digits", "50", "kd-sce", "seed0", "results.json"))
    r = _run_all("--smoke", "--print-commands", **env)
    assert len(r.stdout.splitlines()) == 1 and "kd-sce/seed0" in r.stdout
    assert subprocess.run(["bash", "-c", r.stdout], timeout=300).returncode == 0   # --resume
    assert os.path.exists(os.path.join(out, "digits", "50", "kd-sce", "seed0", "results.json"))

    r = _run_all("--smoke", **dict(env, STEPS=41))      # recorded with other --steps: refuse
    assert r.returncode == 2 and "was run with --steps 40, not 41" in r.stderr
