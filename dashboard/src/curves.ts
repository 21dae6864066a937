// Live training curves (uPlot), one small chart per quantity, x = step.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import type { TrainMetrics } from "./gen/bt/v1/jobs_pb";

// Label, value, whether a log scale applies (positive quantities).
const SERIES: [string, (m: TrainMetrics) => number, boolean][] = [
  ["loss", (m) => m.loss, true],
  ["on-diagonal Σ(1−C_ii)²", (m) => m.onDiag, true],
  ["λ · off-diagonal", (m) => m.offDiagScaled, true],
  ["mean C_ii", (m) => m.meanDiag, false],
  ["mean |C_ij|", (m) => m.meanAbsOffDiag, true],
  ["learning rate", (m) => m.lr, false],
  ["images/s", (m) => m.imagesPerSec, false],
];

/** Exponential moving average with weight `a` on the past (0: the raw values). */
function smooth(ys: number[], a: number): number[] {
  if (!a) return ys;
  const out: number[] = [];
  let s = ys[0] ?? 0;
  for (const y of ys) {
    s = a * s + (1 - a) * y;
    out.push(s);
  }
  return out;
}

export class Curves {
  readonly root: HTMLElement;
  private xs: number[] = [];
  private ys: number[][] = SERIES.map(() => []);
  private plots: uPlot[] = [];
  private pending = false;
  private empty: HTMLElement;
  private charts: HTMLElement;
  private log = false;
  private ema = 0;

  constructor() {
    this.root = document.createElement("div");
    this.root.id = "curves";
    const controls = document.createElement("div");
    controls.className = "curve-controls";
    const log = document.createElement("input");
    log.type = "checkbox";
    log.id = "curves-log";
    log.addEventListener("change", () => {
      this.log = log.checked;
      this.rebuild();
    });
    const logLabel = document.createElement("label");
    logLabel.append(log, " log scale (loss, terms, |C_ij|)");
    const ema = document.createElement("select");
    ema.id = "curves-smoothing";
    for (const [v, t] of [["0", "no smoothing"], ["0.6", "smoothing 0.6"], ["0.9", "smoothing 0.9"], ["0.98", "smoothing 0.98"]]) {
      const o = document.createElement("option");
      o.value = v;
      o.textContent = t;
      ema.append(o);
    }
    ema.addEventListener("change", () => {
      this.ema = Number(ema.value);
      this.rebuild();
    });
    controls.append(logLabel, " ", ema);
    this.charts = document.createElement("div");
    this.charts.className = "curves";
    this.empty = document.createElement("p");
    this.empty.className = "muted";
    this.empty.textContent = "no metrics yet";
    this.charts.append(this.empty);
    this.root.append(controls, this.charts);
  }

  /** What series `i` shows: smoothed, and positive only on a log scale. */
  private view(i: number): (number | null)[] {
    const ys = smooth(this.ys[i], this.ema);
    return this.log && SERIES[i][2] ? ys.map((y) => (y > 0 ? y : null)) : ys;
  }

  private rebuild(): void {
    this.destroy();
    this.charts.replaceChildren();
    if (this.xs.length) this.draw();
    else this.charts.append(this.empty);
  }

  add(m: TrainMetrics): void {
    const step = Number(m.step);
    // Replays after a reconnect can repeat a step: keep the x axis increasing.
    if (this.xs.length && step <= this.xs[this.xs.length - 1]) return;
    this.xs.push(step);
    SERIES.forEach(([, f], i) => this.ys[i].push(f(m)));
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  private draw(): void {
    this.pending = false;
    this.root.dataset.points = String(this.xs.length);
    if (!this.plots.length) {
      this.empty.remove();
      const width = Math.max(260, Math.min(420, Math.floor((this.charts.clientWidth || 900) / 2) - 16));
      this.plots = SERIES.map(([label, , logScale], i) => {
        const cell = document.createElement("div");
        cell.className = "curve";
        cell.dataset.series = label;
        this.charts.append(cell);
        return new uPlot(
          {
            title: label,
            width,
            height: 180,
            legend: { show: false },
            scales: { x: { time: false }, y: { distr: this.log && logScale ? 3 : 1 } },
            axes: [{ label: "step" }, { size: 60 }],
            series: [{ label: "step" }, { label, stroke: "#2563eb", width: 1.5, points: { show: false } }],
          },
          [this.xs, this.view(i)],
          cell,
        );
      });
    } else {
      this.plots.forEach((p, i) => p.setData([this.xs, this.view(i)]));
    }
  }

  destroy(): void {
    this.plots.forEach((p) => p.destroy());
    this.plots = [];
  }
}
