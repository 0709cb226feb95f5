"""PNG chart of a benchmark run (matplotlib, Agg backend).

One pair of panels per mode (forward, redir): delivered datagrams/s and CPU time per
datagram, scenarios along the x axis, one bar per implementation (median, whiskers
min-max), and the C limit of each scenario as a dashed horizontal line over its group.
Rows of the other bench scripts get one panel each when they carry a rate.
"""
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

C_LIMIT = "c-limit"
RATE_KEYS = ("pps", "pps_median", "dgrams_per_s", "dgram_per_s", "datagrams_per_s", "rate")
NAME_KEYS = ("impl", "implementation", "name", "sender", "variant")


def _panels(results):
    modes = []
    for r in results.get("rows", []):
        if r["mode"] not in modes:
            modes.append(r["mode"])
    return modes


def _grouped(ax, rows, key, ylabel, title, colors, scale=1.0):
    scenarios, impls = [], []
    for r in rows:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
        if r["impl"] != C_LIMIT and r["impl"] not in impls and r.get("status") != "not available":
            impls.append(r["impl"])
    by = {(r["scenario"], r["impl"]): r for r in rows}
    width = 0.8 / max(1, len(impls))
    drawn = set()
    for gi, scen in enumerate(scenarios):
        for bi, impl in enumerate(impls):
            r = by.get((scen, impl))
            stat = r.get(key) if r else None
            x = gi - 0.4 + width * (bi + 0.5)
            if not stat:
                if r:       # measured here but unavailable, failed or without this figure
                    label = ("n/a" if r.get("status") in ("not available", "ok")
                             else "error")
                    ax.text(x, 0, label,
                            rotation=90, ha="center", va="bottom", fontsize=6, color="grey")
                continue
            med = stat["median"] * scale
            err = [[med - stat["min"] * scale], [stat["max"] * scale - med]]
            ax.bar(x, med, width * 0.92, color=colors[impl],
                   label=impl if impl not in drawn else None, yerr=err, capsize=2,
                   error_kw={"elinewidth": 0.8})
            drawn.add(impl)
        c = by.get((scen, C_LIMIT))
        if c and c.get(key):
            ax.hlines(c[key]["median"] * scale, gi - 0.45, gi + 0.45, colors="black",
                      linestyles="dashed", linewidth=1.4,
                      label="C limit (fwd_mmsg)" if "c" not in drawn else None)
            drawn.add("c")
        if not any(by.get((scen, i), {}).get(key) for i in impls + [C_LIMIT]):
            ax.text(gi, 0.5, "not available\n(see results.json)", ha="center", va="center",
                    transform=ax.get_xaxis_transform(), fontsize=8, color="grey")
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels([textwrap.fill(sc, 16) for sc in scenarios], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.6, len(scenarios) - 0.4)
    if drawn:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)


def _extra_rows(extra):
    """(labels, values, key) of an extra section's rows that carry a rate, or None."""
    rows = [r for r in extra.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return None
    if all(isinstance(r.get("p99_us"), (int, float)) for r in rows):
        key = "p99_us"                  # the latency section: round-trip p99, not its rate
    else:
        key = next((k for k in RATE_KEYS if all(isinstance(r.get(k), (int, float))
                                                or isinstance(r.get(k), dict) for r in rows)),
                   None)
    if key is None:
        return None
    labels, values = [], []
    for r in rows:
        name = next((str(r[k]) for k in NAME_KEYS if k in r), "?")
        detail = [str(r["family"])] if "family" in r else []
        if key == "p99_us":
            detail = [str(r.get("mode", "")), f"{r.get('rate', '?')}/s"]
        if "size" in r:
            detail.append(f"{r['size']}B")
        if "flows" in r:
            detail.append(f"{r['flows']} flow{'s' if r['flows'] != 1 else ''}")
        labels.append(" ".join([name] + detail))
        v = r[key]
        values.append(v.get("median") if isinstance(v, dict) else v)
    return labels, values, key


def render(results, path):
    modes = _panels(results)
    extras = [(e, _extra_rows(e)) for e in results.get("extras", [])]
    extras = [(e, d) for e, d in extras if d]
    impl_names = []
    for r in results.get("rows", []):
        if r["impl"] not in impl_names and r["impl"] != C_LIMIT:
            impl_names.append(r["impl"])
    cmap = plt.get_cmap("tab20")
    colors = {n: cmap(i % 20) for i, n in enumerate(impl_names)}
    npanels = 2 * len(modes) + len(extras)
    if npanels == 0:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, "no results (see results.json errors)", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    nscen = max([len({r["scenario"] for r in results["rows"] if r["mode"] == m})
                 for m in modes] + [len(d[0]) for _, d in extras] + [1])
    width = max(10.0, 1.6 * nscen + 3)
    fig, axes = plt.subplots(npanels, 1, figsize=(width, 3.6 * npanels), squeeze=False)
    axes = [a[0] for a in axes]
    meta = results.get("meta", {})
    i = 0
    for mode in modes:
        rows = [r for r in results["rows"] if r["mode"] == mode]
        _grouped(axes[i], rows, "pps", "delivered datagrams/s (thousands)",
                 f"{mode}: delivered datagrams/s (median, min-max)", colors, 1e-3)
        _grouped(axes[i + 1], rows, "cpu_us", "relay CPU us per datagram",
                 f"{mode}: CPU per datagram at {meta.get('cpu_offered_pps', '?')} dgram/s "
                 "offered (lower is better)", colors)
        i += 2
    for extra, (labels, values, key) in extras:
        ax = axes[i]
        i += 1
        xs = range(len(labels))
        ax.bar(xs, [v or 0 for v in values], color=[cmap(k % 20) for k in xs])
        for lab, v in zip(labels, values):
            if lab.startswith("c-") and v:      # the C reference of that bench
                ax.axhline(v, color="black", linestyle="dashed", linewidth=1.2,
                           label=f"C limit ({lab.split()[0]})")
                ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                          borderaxespad=0)
                break
        ax.yaxis.set_major_formatter(ticker.EngFormatter())
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8, rotation=20, ha="right")
        ax.set_ylabel(key)
        ax.set_title(f"{extra['section']} ({extra['script']})", fontsize=11, loc="left")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"relay benchmark ({meta.get('profile', '?')}, {meta.get('rounds', '?')} "
                 f"rounds, {meta.get('machine', {}).get('cpus', '?')} CPUs) - "
                 f"{meta.get('date', '')}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
