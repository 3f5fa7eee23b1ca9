"""PNG plots of benchmark results (matplotlib, headless); each names its provenance."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    """Import pyplot headless, on first use (tests that only render tables need no matplotlib)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


COLOURS = {'local': 'tab:gray', 'naive': 'tab:red', 'eager': 'tab:orange',
           'replay': 'tab:blue', 'hybrid': 'tab:green', 'raw': 'tab:blue', 'lz4': 'tab:purple',
           'zstd': 'tab:brown', 'jpeg': 'tab:olive', 'auto': 'tab:cyan',
           'auto_lossy': 'tab:pink'}


def _footer(fig, meta: dict) -> None:
    fig.text(0.01, 0.005, f'{meta["command"].strip()} | {meta["machine"]["description"]} | '
             f'{meta["date"]} | server on {meta["server_device"]}', fontsize=7, color='dimgray')


def _save(fig, meta: dict, path: Path, bottom: float) -> bool:
    """Add the footer, leave ``bottom`` of the figure for it, write ``path``, close."""
    _footer(fig, meta)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return True


def _archs(points: list[dict]) -> list[str]:
    return list(dict.fromkeys(p['arch'] for p in points))


def _grid(points: list[dict], **match) -> list[dict]:
    chosen = [p for p in points if p['link'] and p['link'].startswith('grid_')
              and all(p.get(k) == v for k, v in match.items())]
    return sorted(chosen, key=lambda p: p['up_mbps'])


def latency_vs_bandwidth(meta: dict, points: list[dict], path: Path) -> bool:
    plt = _pyplot()
    archs = _archs(points)
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        modes = [p['mode'] for p in points if p['arch'] == arch and p['section'] == 'modes']
        for mode in dict.fromkeys(modes):
            if mode == 'local':
                local = next(p for p in points if p['arch'] == arch and p['mode'] == 'local')
                ax.axhline(local['median_ms'], color=COLOURS['local'], ls='--',
                           label='local (robot CPU)')
                continue
            grid = _grid(points, arch=arch, section='modes', mode=mode)
            if grid:
                ax.plot([p['up_mbps'] for p in grid], [p['median_ms'] for p in grid], 'o-',
                        color=COLOURS.get(mode), label=mode)
        floor = _grid(points, arch=arch, section='modes', mode='replay')
        if floor and floor[0]['floor_ms']:
            ax.plot([p['up_mbps'] for p in floor], [p['floor_ms'] for p in floor], 'k:',
                    label='floor (RTT + bytes/bw + compute)')
        ax.set(xscale='log', yscale='log', xlabel='link bandwidth, Mbit/s (RTT 4 ms)',
               ylabel='median latency per inference, ms', title=arch)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, meta, path, bottom=0.03)


def round_trips(meta: dict, points: list[dict], path: Path) -> bool:
    plt = _pyplot()
    archs = _archs(points)
    modes = list(dict.fromkeys(p['mode'] for p in points if p['section'] == 'modes'))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        values = []
        for arch in archs:
            rts = [p['round_trips'] for p in points
                   if p['arch'] == arch and p['mode'] == mode and p['section'] == 'modes']
            values.append(max(rts) if rts else 0)
        xs = [a + (i - (len(modes) - 1) / 2) * width for a in range(len(archs))]
        bars = ax.bar(xs, [max(v, 0.5) for v in values], width, color=COLOURS.get(mode),
                      label=mode)
        ax.bar_label(bars, labels=[f'{v:g}' for v in values], fontsize=7)
    ax.set(yscale='log', ylabel='round trips per inference', xticks=range(len(archs)),
           xticklabels=archs, title='Round trips per inference (local: none)')
    ax.legend(fontsize=8)
    return _save(fig, meta, path, bottom=0.04)


def codecs(meta: dict, points: list[dict], path: Path) -> bool:
    plt = _pyplot()
    chosen = [p for p in points if p['section'] == 'codecs']
    if not chosen:
        return False
    archs = _archs(chosen)
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        raw = _grid(points, arch=arch, section='modes', mode='replay')
        series = {'raw': raw}
        for codec in dict.fromkeys(p['codec'] for p in chosen if p['arch'] == arch):
            series[codec] = _grid(points, arch=arch, section='codecs', codec=codec)
        for codec, grid in series.items():
            if grid:
                ax.plot([p['up_mbps'] for p in grid], [p['median_ms'] for p in grid], 'o-',
                        color=COLOURS.get(codec), label=codec)
        ax.set(xscale='log', yscale='log', xlabel='link bandwidth, Mbit/s (RTT 4 ms)',
               ylabel='median latency, ms (record/replay)', title=f'{arch}: input codecs')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, meta, path, bottom=0.03)


def steps(meta: dict, points: list[dict], path: Path) -> bool:
    plt = _pyplot()
    chosen = [p for p in points if p['section'] == 'steps']
    if not chosen:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for p in chosen:
        ax.plot([c['t_s'] for c in p['timeline']], [c['total_ms'] for c in p['timeline']], '.-',
                ms=3, lw=0.7, color=COLOURS.get(p['codec']), label=f'{p["arch"]} {p["codec"]}')
    levels = chosen[0]['link_config']['up']['rate']['steps']
    rate = ax.twinx()
    xs, ys, t = [], [], 0.0
    for mbps, seconds in levels:
        xs += [t, t + seconds]
        ys += [mbps, mbps]
        t += seconds
    rate.plot(xs, ys, color='black', alpha=0.4, lw=2, label='link Mbit/s')
    rate.set(yscale='log', ylabel='link Mbit/s')
    ax.set(yscale='log', xlabel='seconds since the link was set',
           ylabel='latency per inference, ms', title='Record/replay across bandwidth steps')
    ax.legend(fontsize=8, loc='upper left')
    rate.legend(fontsize=8, loc='upper right')
    return _save(fig, meta, path, bottom=0.04)


PLOTS = {'bench_latency_vs_bandwidth.png': latency_vs_bandwidth,
         'bench_round_trips.png': round_trips, 'bench_codecs.png': codecs,
         'bench_steps.png': steps}


def write_all(meta: dict, points: list[dict], docs: Path) -> list[Path]:
    """Write every plot that has data into ``docs``; return the files written."""
    written = []
    for name, plot in PLOTS.items():
        if plot(meta, points, docs / name):
            written.append(docs / name)
    return written
