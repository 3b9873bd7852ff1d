"""Profile the three --bench loops on CUDA: wall ms/step without the profiler, GPU-busy ms/step and
the top CPU / GPU ops with it. Usage: python .gpu/prof.py DATA_DIR [kdfixmatch flags]"""
import sys, time, torch
import kdfixmatch as kd
from torch.profiler import profile, ProfilerActivity

args = kd.get_args(["--dataset", "folder", "--data-dir", sys.argv[1], "--labels", "4000",
                    "--arch", "wrn28_2"] + sys.argv[2:])
args.dev, args.bf16 = torch.device("cuda"), args.precision != "fp32"
torch.backends.cudnn.benchmark = True
data = kd.load_dataset(args)
split = kd.labeled_split(data["train_y"], args.labels, data["classes"], args.seed)
x = data["train_x"][::5].float() / 255
args.mean = x.mean((0, 2, 3)).view(1, -1, 1, 1).cuda()
args.std = x.std((0, 2, 3)).view(1, -1, 1, 1).cuda()
data["x"], data["y"] = data["train_x"].cuda(), data["train_y"].cuda()
model, ema, opt, sched = kd.make_model(args, data)
fwd = torch.compile(model, mode=args.compile_mode) if getattr(args, "compile_mode", None) else model
fixed = kd.make_batch(data, split, 0, 0, args)
step = lambda k, b: kd.train_step(args, fwd, ema, opt, sched, "outer", b, None, k)
for name, fn in (("augment", lambda k: kd.make_batch(data, split, k, 0, args)),
                 ("ceiling", lambda k: step(k, fixed)),
                 ("real", lambda k: step(k, kd.make_batch(data, split, k, 0, args)))):
    for k in range(40):
        fn(k)
    torch.cuda.synchronize()
    t = time.time()
    for k in range(100):
        fn(k)
    torch.cuda.synchronize()
    wall = (time.time() - t) / 100 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(20):
            fn(k)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    dev = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    gpu = sum(dev(e) for e in ka) / 20 / 1e3
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / 20
    print(f"== {name}: wall {wall:.2f} ms/step (no profiler); GPU busy {gpu:.2f} ms/step; "
          f"kernel launches/step {launches:.0f}", flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(ka.table(sort_by=key, row_limit=10, max_name_column_width=40), flush=True)
            break
        except Exception as e:
            print("sort", key, "failed:", e)
