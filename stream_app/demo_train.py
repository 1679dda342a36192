"""A small real training run for the demo and the end-to-end tests.

An MLP learns scikit-learn's bundled handwritten-digits set (1,797 8×8 images, shipped with the
package, no download) with SGD + momentum, reporting every step through ``producers.watch``.
Scenarios inject a real failure:

* ``healthy`` — nothing injected.
* ``lr_jump`` — the learning rate is multiplied by 100 at the middle step (a schedule bug).
* ``nan`` — from 60 % of the run a corrupted batch (an Inf pixel) makes the loss NaN.

    python -m stream_app.demo_train --run-id demo-nan --scenario nan --steps 300
"""

from __future__ import annotations

import argparse
import sys
import time

SCENARIOS = ("healthy", "lr_jump", "nan")


def load_digits_tensors():
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def train(run_id: str, scenario: str, steps: int = 300, lr: float = 0.05, batch_size: int = 32,
          seed: int = 0, delay: float = 0.0, bootstrap: str | None = None, stop_on_request: bool = False) -> dict:
    import torch

    import producers

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    torch.manual_seed(seed)
    x, y = load_digits_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    reporter = producers.watch(run_id, model=model, optimizer=optimizer, bootstrap=bootstrap,
                               tags={"model": "mlp-digits", "scenario": scenario})
    generator = torch.Generator().manual_seed(seed)
    inject_at = {"lr_jump": steps // 2, "nan": int(steps * 0.6)}.get(scenario, -1)
    loss_value = float("nan")
    step = 0
    for step in range(steps):
        if scenario == "lr_jump" and step == inject_at:
            for group in optimizer.param_groups:
                group["lr"] *= 100
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        xb, yb = x[idx], y[idx]
        if scenario == "nan" and step >= inject_at:
            xb = xb.clone()
            xb[0, 0] = float("inf")
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reporter.log(step, loss=loss, batch_size=batch_size)
        loss_value = float(loss.detach())
        if stop_on_request and reporter.should_stop:
            break
        if delay:
            time.sleep(delay)
    reporter.close(timeout=10)
    return {"run_id": run_id, "scenario": scenario, "steps": step + 1, "final_loss": loss_value,
            "inject_at": inject_at, "sent": reporter.emitter.stats.sent, "dropped": reporter.dropped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-id", required=True)
    p.add_argument("--scenario", choices=SCENARIOS, default="healthy")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--delay", type=float, default=0.0, help="seconds to sleep per step (to watch it stream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broker", help="Kafka bootstrap (default LOSSGUARD_BOOTSTRAP)")
    args = p.parse_args(argv)
    result = train(args.run_id, args.scenario, steps=args.steps, delay=args.delay, seed=args.seed,
                   bootstrap=args.broker)
    import json

    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
