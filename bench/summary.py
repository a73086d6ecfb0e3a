"""Render bench/report.json as the README's "Measured" tables (between its bench markers).

Run: .venv/bin/python bench/summary.py [--write]   (without --write it only prints)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def foundation(section: dict[str, Any]) -> list[str]:
    return [
        "| server | figure |",
        "|---|---|",
        f"| process start to first `/health` answer (median of 3) | {section['startup_to_health_ms_median']:.0f} ms |",
        f"| `GET /health` latency p50 / p95 | {section['health_latency_ms']['p50']} / "
        f"{section['health_latency_ms']['p95']} ms |",
        f"| `GET /health/detailed` latency p50 / p95 | {section['health_detailed_latency_ms']['p50']} / "
        f"{section['health_detailed_latency_ms']['p95']} ms |",
        f"| `GET /health` at concurrency 10 | {section['health_throughput_rps_c10']:.0f} req/s, "
        f"{section['errors']} errors |",
    ]


def execution(section: dict[str, Any]) -> list[str]:
    lines = ["| language | p50 ms | p95 ms | errors |", "|---|---|---|---|"]
    for code, figures in sorted(section["languages"].items()):
        lines.append(f"| `{code}` | {figures['p50_ms']} | {figures['p95_ms']} | {figures['errors']} |")
    lines += ["", "| target (issue) | measured | met |", "|---|---|---|"]
    for name, target in section["targets"].items():
        lines.append(f"| {name} {target['target']} | {target['measured']} | {'yes' if target['met'] else 'no'} |")
    baselines = section["baselines"]
    lines += ["", "| bare, outside any jail | bare | through the API (p50) |", "|---|---|---|"]
    for figures in baselines.values():
        lines.append(f"| {figures['what']} | {figures['bare_ms']} ms | {figures['api_p50_ms']} ms |")
    return lines


def files(section: dict[str, Any]) -> list[str]:
    pairs = section["pairs"]
    lines = ["| files | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    rows = [
        ("upload of 100 MiB (chunked multipart)", lambda f: f"{f['upload_100mib_mib_s']} MiB/s"),
        ("server peak RSS growth during that upload", lambda f: f"{f['upload_peak_rss_growth_mib']} MiB"),
        ("download of 100 MiB", lambda f: f"{f['download_100mib_mib_s']} MiB/s"),
        ("`echo hi` (bash) p50, no files", lambda f: f"{f['exec_no_files']['p50_ms']} ms"),
        ("... with 1 file mounted", lambda f: f"{f['exec_1_file_in']['p50_ms']} ms"),
        ("... with 20 files mounted", lambda f: f"{f['exec_20_files_in']['p50_ms']} ms"),
        ("... writing 1 output file", lambda f: f"{f['exec_1_file_out']['p50_ms']} ms"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(figures) for figures in pairs.values()) + " |")
    return lines


def kernels(section: dict[str, Any]) -> list[str]:
    lines = [
        "| Python kernels | p50 | p95 |",
        "|---|---|---|",
        f"| `print(1)` in a session with a live kernel | {section['live_print']['p50_ms']} ms | "
        f"{section['live_print']['p95_ms']} ms |",
        f"| first run of a new session, kernel from the pool | {section['pool_first_run']['p50_ms']} ms | "
        f"{section['pool_first_run']['p95_ms']} ms |",
        f"| session resumed from a 1 MB checkpoint (no live kernel) | {section['restore_1mb']['p50_ms']} ms | "
        f"{section['restore_1mb']['p95_ms']} ms |",
        "",
        f"New-session throughput at concurrency 10: {section['new_session_runs_per_s_c10']} runs/s "
        f"(the reference server: 1.2). Memory of an idle live kernel: {section['idle_kernel_memory_mib_median']} MiB.",
        "",
        "| target (issue) | measured | met |",
        "|---|---|---|",
    ]
    for name, target in section["targets"].items():
        lines.append(f"| {name} {target['target']} | {target['measured']} | {'yes' if target['met'] else 'no'} |")
    return lines


def streaming(section: dict[str, Any]) -> list[str]:
    lines = ["| a flushed line, program to WebSocket client | p50 | p95 | max |", "|---|---|---|---|"]
    for lang in ("py", "bash"):
        figures = section[lang]
        what = "Python (live kernel)" if lang == "py" else "bash (one-shot)"
        lines.append(f"| {what} | {figures['p50_ms']} ms | {figures['p95_ms']} ms | {figures['max_ms']} ms |")
    return lines


def programmatic(section: dict[str, Any]) -> list[str]:
    rows = [("first reply of a run (code up to its first tool call)", section["first_reply"]),
            ("a continuation, answered by the paused kernel", section["live_round"]),
            ("a continuation replayed in another kernel (as on another node)", section["replayed_round"])]  # fmt: skip
    lines = ["| programmatic tool calling, over HTTP | p50 | p95 |", "|---|---|---|"]
    lines += [f"| {label} | {figures['p50_ms']} ms | {figures['p95_ms']} ms |" for label, figures in rows]
    return [*lines, "", "The reference server waits about 0.5 s for stderr at every pause."]


def zygote(section: dict[str, Any]) -> list[str]:
    modes = ("zygote", "nsjail")
    rows = [("new session `print(1)` p50 / p95 (sequential, over HTTP)",
             lambda m: f"{m['new_session_p50_ms']} / {m['new_session_p95_ms']} ms"),
            ("new sessions per second, concurrency 1", lambda m: f"{m['new_sessions_per_s_c1']}"),
            ("... concurrency 4", lambda m: f"{m['new_sessions_per_s_c4']}"),
            ("... concurrency 10", lambda m: f"{m['new_sessions_per_s_c10']}"),
            ("CPU per new session (whole machine, concurrency 10)", lambda m: f"{m['cpu_ms_per_new_session']} ms"),
            ("unique memory per idle kernel", lambda m: f"{m['idle_kernel_unique_mib']} MiB")]  # fmt: skip
    lines = ["| new Python sessions | KERNEL_MODE=zygote | KERNEL_MODE=nsjail |", "|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(cell(section[mode]) for mode in modes) + " |" for label, cell in rows]
    lines += ["", "| target (issue) | measured | met |", "|---|---|---|"]
    for name, target in section["targets"].items():
        lines.append(f"| {name} {target['target']} | {target['measured']} | {'yes' if target['met'] else 'no'} |")
    return lines


def egress(section: dict[str, Any]) -> list[str]:
    proxy, off, on = section["proxy"], section["network_off"], section["network_on"]
    lines = ["| the egress proxy (loopback) | direct | through the proxy |", "|---|---|---|",
             f"| connect (to the CONNECT's 200) p50 / p95 | {proxy['connect_direct']['p50_ms']} / "
             f"{proxy['connect_direct']['p95_ms']} ms | {proxy['connect_through_proxy']['p50_ms']} / "
             f"{proxy['connect_through_proxy']['p95_ms']} ms |",
             f"| download throughput | {proxy['download_mib_per_s_direct']} MiB/s | "
             f"{proxy['download_mib_per_s_through_proxy']} MiB/s ({proxy['throughput_ratio']}x) |"]  # fmt: skip
    lines += ["", "| over HTTP, p50 / p95 | sandbox network off | sandbox network on |", "|---|---|---|"]
    for key, label in (("new_session_py", "new Python session `print(1)`"), ("one_shot_bash", "one-shot `bash`")):
        lines.append(f"| {label} | {off[key]['p50_ms']} / {off[key]['p95_ms']} ms | "
                     f"{on[key]['p50_ms']} / {on[key]['p95_ms']} ms |")  # fmt: skip
    lines.append(f"| `pip install` of a small wheel from a loopback index, first / again (whole request) | | "
                 f"{on['pip_install_first_s']} / {on['pip_install_again_s']} s |")  # fmt: skip
    return lines


def render(report: dict[str, Any]) -> str:
    parts = []
    if "foundation" in report:
        parts += [*foundation(report["foundation"]), ""]
    if "exec" in report:
        parts += [*execution(report["exec"]), ""]
        parts.append(f"Measured {report['exec']['measured_at']} ({report['exec']['method']}).")
    if "kernels" in report:
        measured = f"Measured {report['kernels']['measured_at']} (bench/kernels.py)."
        parts += ["", *kernels(report["kernels"]), "", measured]
    if "zygote" in report:
        measured = (f"Measured {report['zygote']['measured_at']} (bench/zygote.py; zygote throughput is the median "
                    "of three runs each).")  # fmt: skip
        parts += ["", *zygote(report["zygote"]), "", measured]
    if "streaming" in report:
        measured = f"Measured {report['streaming']['measured_at']} (bench/streaming.py; target: within 50 ms)."
        parts += ["", *streaming(report["streaming"]), "", measured]
    if "programmatic" in report:
        measured = f"Measured {report['programmatic']['measured_at']} (bench/programmatic.py)."
        parts += ["", *programmatic(report["programmatic"]), "", measured]
    if "files" in report:
        parts += ["", *files(report["files"]), "", f"Measured {report['files']['measured_at']} (bench/files.py)."]
    if "egress" in report:
        parts += ["", *egress(report["egress"]), "", f"Measured {report['egress']['measured_at']} (bench/egress.py)."]
    return "\n".join(parts).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="replace the section between the README's markers")
    args = parser.parse_args()
    text = render(json.loads((HERE / "report.json").read_text()))
    if not args.write:
        print(text)
        return
    readme = README.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {START} ... {END} section")
    README.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme))


if __name__ == "__main__":
    main()
