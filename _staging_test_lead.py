# ---- The unlabeled loss written out in kdfixmatch.py, and --tensorboard (curves of a run)
import importlib.util  # noqa: E402


def test_unlabeled_loss_written_out_equals_the_kernels_reference_bit_for_bit():
    # kdfixmatch.unlabeled_loss is the training path on a CPU (mask, Heuristic 1, CE or sce_loss);
    # the fused kernel's reference in kernels.py must compute exactly the same numbers
    g = torch.Generator().manual_seed(0)
    weak = torch.randn(64, 10, generator=g) * 4
    strong = torch.randn(64, 10, generator=g, requires_grad=True)
    trusted = torch.randint(-1, 10, (64,), generator=g)
    for t in (None, trusted):
        for loss in ("ce", "sce"):
            got = kd.unlabeled_loss(weak, strong, 0.9, t, loss, 0.3, 0.7, -2.0)
            want = kernels.masked_pseudo_label_loss_torch(weak, strong, 0.9, t, loss, 0.3, 0.7, -2.0)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            (g_got,) = torch.autograd.grad(got[0], strong)
            (g_want,) = torch.autograd.grad(want[0], strong)
            assert torch.equal(g_got, g_want)
    # the SCE path is sce_loss itself: alpha CE + beta (-A)(1 - p_y) on the unmasked rows
    loss_u, mask, target = kd.unlabeled_loss(weak, strong, 0.9, trusted, "sce", 0.3, 0.7, -2.0)
    per_sample = kd.sce_loss(strong, target, 0.3, 0.7, -2.0)
    torch.testing.assert_close(loss_u, (per_sample * mask).sum() / 64)
    p_y = strong.softmax(1).gather(1, target[:, None]).squeeze(1)
    ce = F.cross_entropy(strong, target, reduction="none")
    torch.testing.assert_close(per_sample, 0.3 * ce + 0.7 * 2.0 * (1 - p_y))


def test_tensorboard_curves_read_back_with_tensorboards_own_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    argv = [*_TINY[:-2], "--steps", "8", "--eval-every", "4", "--tensorboard", "--out", str(out)]
    res = kd.main(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage in ("outer", "inner"):
        ev = EventAccumulator(str(out / "tensorboard" / stage))
        ev.Reload()
        tags = set(ev.Tags()["scalars"])
        assert {"loss", "lr", "mask", "pl_precision", "test_acc", "images_per_s"} <= tags
        # the test accuracy curve is the metrics rows' EMA accuracy, step for step
        acc = [(e.step, e.value) for e in ev.Scalars("test_acc")]
        want = [(r["step"], r["test_acc"]) for r in rows if r["stage"] == stage]
        assert [s for s, _ in acc] == [s for s, _ in want] == [4, 8]
        for (_, a), (_, b) in zip(acc, want):
            assert abs(a - b) < 1e-6
        assert [e.value for e in ev.Scalars("lr")][-1] > 0
        assert res[stage]["test_acc"] == want[-1][1]
    ev = EventAccumulator(str(out / "tensorboard" / "trusted"))
    ev.Reload()
    assert ev.Scalars("trusted_size")[0].value == res["trusted"]["trusted_size"]
    assert abs(ev.Scalars("trusted_precision")[0].value - res["trusted"]["trusted_precision"]) < 1e-6


def test_tensorboard_flag_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name == "tensorboard" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as e:
        kd.get_args(["--tensorboard", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--tensorboard" in err and "pip install tensorboard" in err
    # without the flag nothing asks for the package
    assert not kd.get_args(["--out", str(tmp_path / "r")]).tensorboard
