"""Draws dashboards/ferry.json's panels from the benchmark's metric samples.

Grafana is not available here, so this stands in for it: it reads the
dashboard's panels (grid positions, queries, legends, units, stat mappings),
evaluates their PromQL over the samples that bench/run scraped from ferry's
/metrics once a second (target/bench/metrics-samples.jsonl), and lays the
result out on the dashboard's 24-column grid in one PNG.

Only the PromQL the dashboard uses is understood: selectors with label
matchers (=, !=, =~, !~), range selectors, rate() and increase(),
histogram_quantile(), the aggregations sum, min, max and avg with `by`, the
four arithmetic operators between vectors with the same labels or a number,
and Grafana's $__rate_interval, $__range and the dashboard's variables
(every variable means "All", that is `.*`). Anything else is refused with
an error rather than drawn wrong.

Usage: render_dashboard.py DASHBOARD.json SAMPLES.jsonl OUT.png
"""

import json
import math
import re
import sys
from collections import defaultdict

# Each scrape is a second apart; Grafana's $__rate_interval would be four
# scrape intervals.
RATE_INTERVAL = 5.0
# How long an instant selector looks back for a sample. Short, so that a
# stopped ferry's series end instead of being carried across the gap.
LOOKBACK = 2.5

# ---------------------------------------------------------------------------
# Samples


def parse_series(key):
    """'name{a="x",b="y"}' -> ('name', (('a', 'x'), ('b', 'y')))"""
    if "{" not in key:
        return key, ()
    name, rest = key.split("{", 1)
    rest = rest.rstrip("}")
    labels = []
    i = 0
    while i < len(rest):
        eq = rest.index("=", i)
        label = rest[i:eq].strip().lstrip(",").strip()
        assert rest[eq + 1] == '"', key
        j = eq + 2
        value = []
        while rest[j] != '"':
            if rest[j] == "\\":
                j += 1
                value.append({"n": "\n"}.get(rest[j], rest[j]))
            else:
                value.append(rest[j])
            j += 1
        labels.append((label, "".join(value)))
        i = j + 1
        while i < len(rest) and rest[i] in ", ":
            i += 1
    return name, tuple(sorted(labels))


class Samples:
    def __init__(self, path):
        self.times = []
        self.phases = []  # (time, phase)
        self.series = defaultdict(list)  # (name, labels) -> [(t, v)]
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                s = json.loads(line)
                t = float(s["t"])
                self.times.append(t)
                self.phases.append((t, s.get("phase", "")))
                for key, v in s["metrics"].items():
                    self.series[parse_series(key)].append((t, float(v)))
        if not self.times:
            raise SystemExit(f"{path}: no samples")
        self.by_name = defaultdict(list)
        for (name, labels), points in self.series.items():
            self.by_name[name].append((labels, points))


# ---------------------------------------------------------------------------
# PromQL subset: tokens, parser, evaluator

TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>\d+(?:\.\d+)?(?![smhd\w]))
    | (?P<dur>\d+(?:\.\d+)?[smhd])
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<op>=~|!~|!=|[-+*/(){}\[\],=])
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    )""",
    re.X,
)
AGGREGATIONS = {"sum", "min", "max", "avg"}
FUNCTIONS = {"rate", "increase", "histogram_quantile"}


def tokenize(text):
    out, i = [], 0
    text = text.strip()
    while i < len(text):
        m = TOKEN.match(text, i)
        if not m or m.end() == i:
            raise ValueError(f"cannot read {text[i:]!r} in {text!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def seconds(d):
    return float(d[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[d[-1]]


class Parser:
    """Builds a small tree of tuples from an expression."""

    def __init__(self, text):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    def peek(self, value=None):
        if self.i >= len(self.toks):
            return None
        tok = self.toks[self.i]
        return tok if value is None or tok[1] == value else None

    def take(self, value=None):
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value or 'more'} in {self.text!r} at token {self.i}")
        self.i += 1
        return tok

    def parse(self):
        e = self.additive()
        if self.peek():
            raise ValueError(f"unexpected {self.peek()[1]!r} in {self.text!r}")
        return e

    def additive(self):
        e = self.multiplicative()
        while self.peek("+") or self.peek("-"):
            op = self.take()[1]
            e = ("bin", op, e, self.multiplicative())
        return e

    def multiplicative(self):
        e = self.primary()
        while self.peek("*") or self.peek("/"):
            op = self.take()[1]
            e = ("bin", op, e, self.primary())
        return e

    def labels(self):
        self.take("(")
        names = []
        while not self.peek(")"):
            names.append(self.take()[1])
            if self.peek(","):
                self.take(",")
        self.take(")")
        return tuple(names)

    def primary(self):
        kind, value = self.take()
        if kind == "num":
            return ("num", float(value))
        if value == "(":
            e = self.additive()
            self.take(")")
            return e
        if kind != "ident":
            raise ValueError(f"unexpected {value!r} in {self.text!r}")
        if value in AGGREGATIONS:
            by = self.labels() if self.peek("by") and self.take() else None
            self.take("(")
            inner = self.additive()
            self.take(")")
            if by is None and self.peek("by"):
                self.take()
                by = self.labels()
            return ("agg", value, by or (), inner)
        if value in FUNCTIONS:
            self.take("(")
            args = [self.additive()]
            while self.peek(","):
                self.take(",")
                args.append(self.additive())
            self.take(")")
            return ("call", value, args)
        if self.peek("(") or value in ("without", "on", "ignoring", "offset"):
            raise ValueError(f"{value} is not supported by this renderer ({self.text!r})")
        matchers = []
        if self.peek("{"):
            self.take("{")
            while not self.peek("}"):
                label = self.take()[1]
                op = self.take()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"bad matcher {op!r} in {self.text!r}")
                raw = self.take()[1]
                matchers.append((label, op, json.loads(raw)))
                if self.peek(","):
                    self.take(",")
            self.take("}")
        rng = None
        if self.peek("["):
            self.take("[")
            rng = seconds(self.take()[1])
            self.take("]")
        return ("sel", value, tuple(matchers), rng)


def matches(labels, matchers):
    d = dict(labels)
    for label, op, want in matchers:
        have = d.get(label, "")
        if op == "=" and have != want:
            return False
        if op == "!=" and have == want:
            return False
        if op == "=~" and not re.fullmatch(want, have):
            return False
        if op == "!~" and re.fullmatch(want, have):
            return False
    return True


def window(points, start, end):
    return [(t, v) for t, v in points if start < t <= end]


def increase(points):
    """Counter increase over the points, counting resets (a restarted ferry)
    as starting again from zero."""
    inc = 0.0
    for (_, a), (_, b) in zip(points, points[1:]):
        inc += b - a if b >= a else b
    return inc


def bucket_quantile(q, buckets):
    """Prometheus' histogram_quantile over [(le, cumulative count)]."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == math.inf:
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def drop(labels, names):
    return tuple((k, v) for k, v in labels if k not in names)


def keep(labels, names):
    return tuple((k, v) for k, v in labels if k in names)


class Evaluator:
    def __init__(self, samples):
        self.s = samples

    def at(self, node, t):
        """The instant vector {labels: value} of `node` at time t."""
        kind = node[0]
        if kind == "num":
            return {(): node[1]}
        if kind == "sel":
            _, name, matchers, rng = node
            if rng is not None:
                raise ValueError(f"range selector {name}[...] outside rate() or increase()")
            out = {}
            for labels, points in self.s.by_name.get(name, []):
                if matches(labels, matchers):
                    recent = window(points, t - LOOKBACK, t)
                    if recent:
                        out[labels] = recent[-1][1]
            return out
        if kind == "call":
            _, fn, args = node
            if fn in ("rate", "increase"):
                sel = args[0]
                if sel[0] != "sel" or sel[3] is None:
                    raise ValueError(f"{fn}() needs a range selector")
                _, name, matchers, rng = sel
                out = {}
                for labels, points in self.s.by_name.get(name, []):
                    if not matches(labels, matchers):
                        continue
                    w = window(points, t - rng, t)
                    if len(w) < 2:
                        continue
                    span = w[-1][0] - w[0][0]
                    if span <= 0:
                        continue
                    per_second = increase(w) / span
                    out[labels] = per_second if fn == "rate" else per_second * rng
                return out
            if fn == "histogram_quantile":
                q = self.at(args[0], t)[()]
                groups = defaultdict(list)
                for labels, v in self.at(args[1], t).items():
                    d = dict(labels)
                    if "le" not in d:
                        continue
                    le = math.inf if d["le"] == "+Inf" else float(d["le"])
                    groups[drop(labels, ("le",))].append((le, v))
                out = {}
                for labels, buckets in groups.items():
                    v = bucket_quantile(q, buckets)
                    if not math.isnan(v):
                        out[labels] = v
                return out
        if kind == "agg":
            _, op, by, inner = node
            groups = defaultdict(list)
            for labels, v in self.at(inner, t).items():
                groups[keep(labels, by)].append(v)
            f = {"sum": sum, "min": min, "max": max, "avg": lambda xs: sum(xs) / len(xs)}[op]
            return {k: f(vs) for k, vs in groups.items()}
        if kind == "bin":
            _, op, l, r = node
            a, b = self.at(l, t), self.at(r, t)
            f = {
                "+": lambda x, y: x + y,
                "-": lambda x, y: x - y,
                "*": lambda x, y: x * y,
                "/": lambda x, y: x / y if y != 0 else math.nan,
            }[op]
            if l[0] == "num":
                return {k: f(a[()], v) for k, v in b.items()}
            if r[0] == "num":
                return {k: f(v, b[()]) for k, v in a.items()}
            return {k: f(v, b[k]) for k, v in a.items() if k in b}
        raise ValueError(f"cannot evaluate {node!r}")

    def range(self, expr, times):
        """{labels: [value or nan per time]} of an expression over `times`."""
        node = Parser(expr).parse()
        out = defaultdict(lambda: [math.nan] * len(times))
        for i, t in enumerate(times):
            for labels, v in self.at(node, t).items():
                out[labels][i] = v
        return dict(out)


def substitute(expr, span):
    expr = expr.replace("$__rate_interval", f"{RATE_INTERVAL:g}s")
    expr = expr.replace("$__range", f"{max(span, 1):.0f}s")
    # Every dashboard variable stands for "All".
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def legend(fmt, labels):
    d = dict(labels)
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in labels) or "total"
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt)
    return re.sub(r"\s+", " ", text.replace("()", "")).strip() or "total"


# ---------------------------------------------------------------------------
# Drawing

BG = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e9e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0"]
PHASE_COLORS = ["#8ab8ff", "#f2cc0c", "#f2495c", "#73bf69", "#b877d9", "#ff780a"]
COLOR_NAMES = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830", "yellow": "#fade2a"}


def human(v, unit):
    if v is None or math.isnan(v):
        return "no data"
    if unit == "s":
        a = abs(v)
        if a == 0:
            return "0 s"
        if a < 1e-3:
            return f"{v * 1e6:.0f} µs"
        if a < 1:
            return f"{v * 1e3:.3g} ms"
        if a < 120:
            return f"{v:.3g} s"
        if a < 7200:
            return f"{v / 60:.3g} min"
        return f"{v / 3600:.3g} h"
    if unit == "bytes":
        for step, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(v) >= step:
                return f"{v / step:.3g} {name}"
        return f"{v:.0f} B"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g} M"
    if a >= 1e4:
        return f"{v / 1e3:.3g} k"
    if a >= 100 or v == round(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


def phase_spans(samples):
    """[(phase, start, end)] of consecutive samples of one phase."""
    spans = []
    for t, p in samples.phases:
        if spans and spans[-1][0] == p and t - spans[-1][2] < 30:
            spans[-1][2] = t
        else:
            spans.append([p, t, t])
    return spans


def main(dashboard_path, samples_path, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    dash = json.load(open(dashboard_path))
    samples = Samples(samples_path)
    ev = Evaluator(samples)
    times = samples.times
    t0 = times[0]
    span = times[-1] - t0
    xs = [t - t0 for t in times]
    spans = phase_spans(samples)
    names = []
    for p, _, _ in spans:
        if p not in names:
            names.append(p)
    phase_color = {p: PHASE_COLORS[i % len(PHASE_COLORS)] for i, p in enumerate(names)}

    panels = [p for p in dash["panels"] if p.get("type") in ("timeseries", "stat")]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_px, col_px, header_px = 30, 75, 120
    width_px, height_px = 24 * col_px, rows * unit_px + header_px
    dpi = 100
    fig = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor=BG)

    def box(x, y, w, h):
        """Figure coordinates of a rectangle given in pixels from the top left."""
        return [x / width_px, 1 - (y + h) / height_px, w / width_px, h / height_px]

    fig.text(12 / width_px, 1 - 24 / height_px, dash.get("title", "dashboard"), color=TEXT,
             fontsize=16, fontweight="bold", va="center")
    fig.text(12 / width_px, 1 - 50 / height_px,
             "Rendered by bench/render-dashboard from dashboards/ferry.json and the metrics that bench/run "
             "scraped from ferry once a second (target/bench/metrics-samples.jsonl); not a Grafana screenshot. "
             "Variables: All. Stat panels show the last value of the run.",
             color=MUTED, fontsize=9, va="center")
    strip = fig.add_axes(box(12, 66, width_px - 24, 40))
    strip.set_facecolor(PANEL)
    for p, a, b in spans:
        strip.axvspan(a - t0, max(b - t0, a - t0 + 1), color=phase_color[p], alpha=0.55)
        strip.text((a + b) / 2 - t0, 0.5, p, ha="center", va="center", fontsize=8, color="#000000", clip_on=True)
    strip.set_xlim(0, max(span, 1))
    strip.set_yticks([])
    strip.tick_params(colors=MUTED, labelsize=7, length=2)
    strip.set_xlabel("seconds since the first sample (benchmark phases)", color=MUTED, fontsize=7, labelpad=1)
    for side in strip.spines.values():
        side.set_color(BORDER)

    for panel in panels:
        g = panel["gridPos"]
        x, y = g["x"] * col_px, header_px + g["y"] * unit_px
        w, h = g["w"] * col_px, g["h"] * unit_px
        pad = 4
        frame = fig.add_axes(box(x + pad, y + pad, w - 2 * pad, h - 2 * pad))
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for side in frame.spines.values():
            side.set_color(BORDER)
        frame.text(0.012, 1 - 13 / (h - 2 * pad), panel["title"], transform=frame.transAxes,
                   color=TEXT, fontsize=9, fontweight="bold", va="center")
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit", "short")
        results = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], span)
            for labels, values in sorted(ev.range(expr, times).items()):
                results.append((legend(target.get("legendFormat", ""), labels), values))

        if panel["type"] == "stat":
            values = results[0][1] if results else []
            last = next((v for v in reversed(values) if not math.isnan(v)), math.nan)
            text, color = human(last, unit), TEXT
            for m in defaults.get("mappings", []):
                hit = m.get("options", {}).get(f"{last:g}") if not math.isnan(last) else None
                if hit:
                    text = hit.get("text", text)
                    color = COLOR_NAMES.get(hit.get("color"), color)
            steps = defaults.get("thresholds", {}).get("steps", [])
            if steps and not math.isnan(last) and not defaults.get("mappings"):
                for step in steps:
                    if step["value"] is None or last >= step["value"]:
                        color = COLOR_NAMES.get(step["color"], color)
            spark = fig.add_axes(box(x + pad + 2, y + h * 0.55, w - 2 * pad - 4, h * 0.45 - pad - 2))
            spark.axis("off")
            if values:
                spark.fill_between(xs, [0 if math.isnan(v) else v for v in values], color=color, alpha=0.18, lw=0)
                spark.set_xlim(0, max(span, 1))
            frame.text(0.5, 0.45, text, transform=frame.transAxes, color=color, fontsize=22,
                       fontweight="bold", ha="center", va="center")
            continue

        legend_rows = max(1, math.ceil(len(results) / 3))
        top, bottom = 26, 22 + 13 * legend_rows
        ax = fig.add_axes(box(x + pad + 58, y + pad + top, w - 2 * pad - 70, h - 2 * pad - top - bottom))
        ax.set_facecolor(PANEL)
        for p, a, b in spans:
            ax.axvspan(a - t0, max(b - t0, a - t0 + 1), color=phase_color[p], alpha=0.07, lw=0)
        drawn = 0
        for i, (name, values) in enumerate(results):
            if all(math.isnan(v) for v in values):
                continue
            ax.plot(xs, values, color=PALETTE[i % len(PALETTE)], lw=1.1, label=name)
            drawn += 1
        ax.set_xlim(0, max(span, 1))
        ax.tick_params(colors=MUTED, labelsize=7, length=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v, unit)))
        ax.grid(color=BORDER, lw=0.5)
        for side in ax.spines.values():
            side.set_visible(False)
        if drawn:
            ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.1), ncol=3, frameon=False, fontsize=7,
                      labelcolor=TEXT, handlelength=1.2, borderaxespad=0.2)
        else:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no data in this run", transform=ax.transAxes, color=MUTED,
                    fontsize=9, ha="center", va="center")

    fig.savefig(out_path, facecolor=BG)
    print(f"render-dashboard: {len(panels)} panels, {len(times)} samples over {span:.0f} s -> {out_path}")


def self_test():
    """Checks the evaluator on made-up samples (run with --self-test)."""
    import tempfile

    lines = []
    for i in range(10):
        m = {
            'c_total{topic="t"}': 10.0 * i if i < 6 else 10.0 * (i - 6),  # reset at 6
            "g": float(i),
            'h_bucket{le="0.1"}': 1.0 * i,
            'h_bucket{le="1.0"}': 3.0 * i,
            'h_bucket{le="+Inf"}': 4.0 * i,
            'h_count': 4.0 * i,
        }
        lines.append(json.dumps({"t": 100.0 + i, "phase": "x", "metrics": m}))
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(lines))
    ev = Evaluator(Samples(f.name))
    at = lambda e, t: ev.at(Parser(substitute(e, 9)).parse(), t)
    assert at('rate(c_total{topic=~"$x"}[5s])', 105) == {(("topic", "t"),): 10.0}
    # 40, 50, reset to 0, 10, 20: Prometheus counts the reset as starting from 0.
    assert at("sum(rate(c_total[5s]))", 108) == {(): 7.5}
    assert at("g / 2", 104) == {(): 2.0}
    q = at("histogram_quantile(0.5, sum by (le) (rate(h_bucket[5s])))", 105)[()]
    assert abs(q - (0.1 + 0.9 * (2 - 1) / (3 - 1))) < 1e-9, q
    assert at("sum(rate(c_total[5s])) / sum(rate(h_count[5s]))", 104) == {(): 2.5}
    assert parse_series('a{b="x,y",c="z"}') == ("a", (("b", "x,y"), ("c", "z")))
    print("render-dashboard: self-test ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    elif len(sys.argv) == 4:
        main(*sys.argv[1:])
    else:
        raise SystemExit(__doc__)
