"""Distill step against SFT step on the CPU, at the real vocabulary (V = 128256, hidden 64), same run.

    python bench/distill_cpu.py [--steps 10] [--batch 2] [--seq 256]   (about 2 minutes here)

SFT and distill train the same student on the same rows with the same batch; the capture (k = 64,
fp16) is made first and not timed. Each stage runs in its own process under bench/_measure.py, so the
peak RSS is that stage's alone. Goals (issue 25): distill ms/step <= 1.05 x SFT's, distill peak RSS <=
1.1 x SFT's. On a CPU the KD loss itself costs little; the GPU gap is bench/gpu_smoke.py's to show.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from gpu_smoke import TINY, build_model, write_data  # noqa: E402

WORKER = """
import json, sys
from pathlib import Path
import posttrain
mode, base, chat, registry, steps, batch, seq = sys.argv[1:8]
data = {"sources": [{"path": chat}], "max_length": int(seq)}
training = {"max_steps": int(steps), "per_device_train_batch_size": int(batch), "learning_rate": 1e-4,
            "report_to": [], "logging_steps": 5}
if mode == "sft":
    out = posttrain.sft(base, data, registry=registry, chat_template="llama-3.1", stage={"save_steps": 10**6}, **training)
elif mode == "capture":
    out = posttrain.capture_logits(base, data, registry=registry, chat_template="llama-3.1", k=64, batch_size=int(batch))
else:
    capture = Path(sys.argv[8])
    out = posttrain.distill(base, capture, registry=registry, chat_template="llama-3.1", stage={"save_steps": 10**6},
                            **training)
Path(registry, mode + ".json").write_text(json.dumps({"path": str(out),
    "metrics": json.loads((Path(out) / "manifest.json").read_text())["metrics"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "base", TINY)
        chat, _ = write_data(tmp, rows=args.steps * args.batch, words=args.seq)
        worker, measured, registry = tmp / "worker.py", tmp / "measured.jsonl", tmp / "registry"
        worker.write_text(WORKER)
        env = dict(os.environ, PYTHONPATH=str(ROOT), POSTTRAIN_REGISTRY=str(registry))
        results = {}
        for mode in ("sft", "capture", "distill"):
            extra = [json.loads((registry / "capture.json").read_text())["path"]] if mode == "distill" else []
            subprocess.run([sys.executable, str(ROOT / "bench" / "_measure.py"), str(measured), str(worker), mode,
                            str(tmp / "base"), str(chat), str(registry), str(args.steps), str(args.batch),
                            str(args.seq), *extra], check=True, env=env, capture_output=True)
            peak = json.loads(measured.read_text().splitlines()[-1])
            print(f"  ({mode}: {peak['seconds']:.1f} s)", flush=True)
            results[mode] = {**json.loads((registry / f"{mode}.json").read_text())["metrics"], **peak}
    sft, kd = results["sft"], results["distill"]
    step = {m: results[m]["train_seconds"] / results[m]["steps"] * 1000 for m in ("sft", "distill")}
    peak_key = next(k for k in ("peak_anon_mb", "peak_rss_mb") if k in sft)
    print(f"distill vs SFT, tiny Llama (hidden 64, V = 128256), {args.steps} steps of {args.batch} x {args.seq}, CPU")
    print(f"  SFT      {step['sft']:8.1f} ms/step (baseline)   peak {sft[peak_key]:7.0f} MB")
    print(f"  distill  {step['distill']:8.1f} ms/step   ratio {step['distill'] / step['sft']:.3f} (goal <= 1.05)   "
          f"peak {kd[peak_key]:7.0f} MB   ratio {kd[peak_key] / sft[peak_key]:.3f} (goal <= 1.1)")
    print(f"  capture  {results['capture']['seconds']:8.1f} s for {results['capture']['tokens']} tokens (not compared)")


if __name__ == "__main__":
    main()
