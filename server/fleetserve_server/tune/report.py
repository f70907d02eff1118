"""What `fleetserve tune` prints: the throughput-vs-latency table, the advice, the frontier plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fleetserve_server.tune.search import Advice, Objective, SettingResult, patch


def table(results: Sequence[SettingResult], objective: Objective) -> str:
    header = (f"{'setting':<40} {'KV tokens':>9} {'offered':>8} {'ok/total':>9} {'out tok/s':>9} "
              f"{'TTFT p50/p99 s':>15} {'TPOT p50/p99 ms':>16}  verdict")
    rows = [f"objective: {objective}", header, "-" * len(header)]
    for r in results:
        if not r.fits:
            rows.append(f"{r.setting.label:<40} {'-':>9} skipped: the memory planner says it does not fit "
                        f"({r.plan_message.split(';')[0]})")
            continue
        if r.error and not r.trials:
            rows.append(f"{r.setting.label:<40} {r.kv_tokens:>9} error: {r.error.splitlines()[0][:120]}")
            continue
        for t in r.trials:
            s = t.summary
            ttft = "/".join("-" if s["ttft_s"][k] is None else f"{s['ttft_s'][k]:.2f}" for k in ("p50", "p99"))
            tpot = "/".join("-" if s["tpot_s"][k] is None else f"{s['tpot_s'][k] * 1000:.0f}" for k in ("p50", "p99"))
            rows.append(f"{r.setting.label:<40} {r.kv_tokens:>9} {t.rate:>8.2f} "
                        f"{s['requests'] - s['failures']:>4}/{s['requests']:<4} {s['output_throughput']:>9.1f} "
                        f"{ttft:>15} {tpot:>16}  {'MET' if t.meets else 'missed'}: {t.reason}")
        rows.append(f"{'':<40} capacity under the objective: {r.capacity_text()}")
    return "\n".join(rows)


def advice_text(advice: Advice) -> str:
    lines = []
    if advice.best is not None:
        lines.append(f"best: {advice.best.setting.label} — {advice.best.capacity_text()}; "
                     f"{advice.replicas_best} replica(s) for the peak {advice.peak_rate:.2f} req/s")
    d = advice.default
    lines.append(f"default: {d.setting.label} — {d.capacity_text()}; "
                 + (f"{advice.replicas_default} replica(s)" if advice.replicas_default else
                    "never met the objective"))
    lines += [f"- {n}" for n in advice.notes]
    return "\n".join(lines)


def patch_yaml(advice: Advice) -> str:
    return ("# fleetserve tune: merge into the LLMDeployment, e.g.\n"
            "#   kubectl patch llmd NAME --type merge --patch-file tune.yaml\n"
            + yaml.safe_dump(patch(advice), sort_keys=False))


def to_json(workload: dict[str, Any], objective: Objective, results: Sequence[SettingResult],
            larger: Sequence[SettingResult], advice: Advice) -> str:
    def one(r: SettingResult) -> dict[str, Any]:
        return {"setting": r.setting.to_dict(), "fits": r.fits, "plan": r.plan_message, "kv_tokens": r.kv_tokens,
                "device_memory": r.device_memory, "capacity_rps": r.capacity, "limit_found": r.limit_found,
                "error": r.error,
                "trials": [{"rate": t.rate, "meets": t.meets, "reason": t.reason, "sustained": t.sustained,
                            "served_rps": t.served_rate, "summary": t.summary}
                           for t in r.trials]}

    return json.dumps({"workload": workload, "objective": {"ttft_p99_s": objective.ttft_p99_s,
                                                           "tpot_p99_s": objective.tpot_p99_s},
                       "results": [one(r) for r in results], "larger_device": [one(r) for r in larger],
                       "advice": advice.to_dict()}, indent=2)


def plot(results: Sequence[SettingResult], objective: Objective, advice: Advice, path: Path, title: str) -> None:
    """Draw :func:`frontier_figure` into ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = frontier_figure(results, objective, advice, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_figure(results: Sequence[SettingResult], objective: Objective, advice: Advice, title: str) -> Any:
    """Output throughput against TTFT p99 (left) and TPOT p99 (right) for every trial, one line per
    setting; each objective bound dashed; trials that missed the objective hollow; the recommended
    setting drawn thick. Both panels, because a setting can fail on either bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(11, 5))
    for r in results:
        trials = sorted((t for t in r.trials if t.summary["ttft_s"]["p99"] is not None),
                        key=lambda t: t.summary["output_throughput"])
        if not trials:
            continue
        best = advice.best is not None and r.setting == advice.best.setting
        label = r.setting.label + (" (best)" if best else "") + (" (default)" if r is advice.default else "")
        x = [t.summary["output_throughput"] for t in trials]
        for ax, key, scale in ((ax_ttft, "ttft_s", 1.0), (ax_tpot, "tpot_s", 1000.0)):
            y = [(t.summary[key]["p99"] or 0.0) * scale for t in trials]
            (line,) = ax.plot(x, y, lw=3 if best else 1, label=label)
            ax.scatter(x, y, s=40, zorder=3, edgecolors=line.get_color(),
                       facecolors=[line.get_color() if t.meets else "none" for t in trials])
    ax_ttft.axhline(objective.ttft_p99_s, ls="--", color="grey", label=f"objective {objective.ttft_p99_s:g} s")
    ax_tpot.axhline(objective.tpot_p99_s * 1000, ls="--", color="grey",
                    label=f"objective {objective.tpot_p99_s * 1000:.0f} ms")
    ax_ttft.set_ylabel("TTFT p99 (s)")
    ax_ttft.set_yscale("log")
    ax_tpot.set_ylabel("TPOT p99 (ms)")
    for ax in (ax_ttft, ax_tpot):
        ax.set_xlabel("output tokens/s (hollow: the trial missed the objective)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
