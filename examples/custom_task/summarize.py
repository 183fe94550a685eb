"""Print the measured table (markdown) from measure.sh's results: python summarize.py OUT_DIR."""

import json
import sys
from pathlib import Path


def rate(r):
    return "-" if not r else f"{r['rate']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


def table(doc: dict, seconds: dict, judge: str) -> str:
    lines = [f"| model | {judge} good-rate | win rate vs sft ({judge}) | KL to sft (nats/reply) | distinct-2 | length (tokens) | train seconds | guard |",
             "|---|---|---|---|---|---|---|---|"]
    rows = list(doc["models"].items()) + [("sft", doc["reference_stats"])]
    for name, st in rows:
        vs = st.get("vs_reference") or {}
        good = st["judge"]["good"] if judge == "judge" else st["gold"]["good"]
        win = vs.get("win_rate_judge") if judge == "judge" else vs.get("win_rate_gold")
        kl = vs.get("kl", {}).get("mean")
        s = seconds.get(name, {})
        lines.append(f"| {name} | {rate(good)} | {rate(win)} | {'-' if kl is None else f'{kl:.1f}'} | "
                     f"{st['distinct_2']:.3f} | {st['mean_length']:.1f} | {s.get('seconds', '-')} | "
                     f"{s.get('guard_warning', '-') if s else '-'} |")
    return "\n".join(lines)


def main(out: Path) -> None:
    res = out / "res"
    for prefix, judge in (("c", "judge"), ("d", "gold")):
        seconds = {}
        for f in sorted(res.glob(f"{prefix}-*.json")):
            try:
                doc = json.loads(f.read_text() or "{}")
            except json.JSONDecodeError:
                continue
            if "model" in doc and isinstance(doc["model"], str):
                seconds[doc["model"]] = doc
        cmp = res / f"{prefix}-compare.json"
        if cmp.is_file() and cmp.read_text().strip():
            print(f"\n## {'custom task' if prefix == 'c' else 'demo'}\n")
            print(table(json.loads(cmp.read_text()), seconds, judge))
        for name, doc in seconds.items():
            keep = {k: doc.get(k) for k in ("steps", "heldout_accuracy", "logps/chosen", "reward_first", "reward", "kl",
                                             "reply_len", "distinct2", "guard_warning") if k in doc}
            print(f"- {prefix} {name}: {keep}")
    guard = res / "c-dpo-old-guard.err"
    if guard.is_file():
        print("\nguard (custom, old defaults, --guard stop):", guard.read_text().strip().splitlines()[-1:])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
