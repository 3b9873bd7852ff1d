"""Experiment: wall ms/step of the ceiling and the real loop with the model compiled in a given mode
(CUDA graphs via "reduce-overhead"), and whether the losses track eager. Usage: python .gpu/exp.py DATA MODE"""
import sys, time, torch
import kdfixmatch as kd

args = kd.get_args(["--dataset", "folder", "--data-dir", sys.argv[1], "--labels", "4000", "--arch", "wrn28_2"])
args.dev, args.bf16 = torch.device("cuda"), True
torch.backends.cudnn.benchmark = True
data = kd.load_dataset(args)
split = kd.labeled_split(data["train_y"], args.labels, data["classes"], args.seed)
x = data["train_x"][::5].float() / 255
args.mean, args.std = x.mean((0, 2, 3)).view(1, -1, 1, 1).cuda(), x.std((0, 2, 3)).view(1, -1, 1, 1).cuda()
data["x"], data["y"] = data["train_x"].cuda(), data["train_y"].cuda()
for mode in sys.argv[2:]:
    torch.manual_seed(0)
    model, ema, opt, sched = kd.make_model(args, data)
    fwd = model if mode == "eager" else torch.compile(model, mode=mode)
    mark = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else (lambda: None)
    def step(k, b):
        mark()
        return kd.train_step(args, fwd, ema, opt, sched, "outer", b, None, k)
    fixed = kd.make_batch(data, split, 0, 0, args)
    t = time.time()
    losses = [step(k, kd.make_batch(data, split, k, 0, args))[0].item() for k in range(30)]
    print(f"{mode}: first 30 real steps (incl. compile) {time.time() - t:.1f} s; losses {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    for name, fn in (("ceiling", lambda k: step(k, fixed)), ("real", lambda k: step(k, kd.make_batch(data, split, k, 0, args)))):
        for k in range(30):
            fn(k)
        torch.cuda.synchronize()
        t = time.time()
        for k in range(200):
            out = fn(k)
        torch.cuda.synchronize()
        print(f"{mode} {name}: {(time.time() - t) / 200 * 1e3:.2f} ms/step, last loss {out[0].item():.3f}", flush=True)
