// Live training curves (uPlot), one small chart per quantity, x = step.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import type { TrainMetrics } from "./gen/bt/v1/jobs_pb";

const SERIES: [string, (m: TrainMetrics) => number][] = [
  ["loss", (m) => m.loss],
  ["on-diagonal Σ(1−C_ii)²", (m) => m.onDiag],
  ["λ · off-diagonal", (m) => m.offDiagScaled],
  ["mean C_ii", (m) => m.meanDiag],
  ["mean |C_ij|", (m) => m.meanAbsOffDiag],
  ["learning rate", (m) => m.lr],
  ["images/s", (m) => m.imagesPerSec],
];

export class Curves {
  readonly root: HTMLElement;
  private xs: number[] = [];
  private ys: number[][] = SERIES.map(() => []);
  private plots: uPlot[] = [];
  private pending = false;
  private empty: HTMLElement;

  constructor() {
    this.root = document.createElement("div");
    this.root.className = "curves";
    this.root.id = "curves";
    this.empty = document.createElement("p");
    this.empty.className = "muted";
    this.empty.textContent = "no metrics yet";
    this.root.append(this.empty);
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
    if (!this.plots.length) {
      this.empty.remove();
      const width = Math.max(260, Math.min(420, Math.floor((this.root.clientWidth || 900) / 2) - 16));
      this.plots = SERIES.map(([label], i) => {
        const cell = document.createElement("div");
        cell.className = "curve";
        cell.dataset.series = label;
        this.root.append(cell);
        return new uPlot(
          {
            title: label,
            width,
            height: 180,
            legend: { show: false },
            scales: { x: { time: false } },
            axes: [{ label: "step" }, { size: 60 }],
            series: [{ label: "step" }, { label, stroke: "#2563eb", width: 1.5, points: { show: false } }],
          },
          [this.xs, this.ys[i]],
          cell,
        );
      });
    } else {
      this.plots.forEach((p, i) => p.setData([this.xs, this.ys[i]]));
    }
  }

  destroy(): void {
    this.plots.forEach((p) => p.destroy());
    this.plots = [];
  }
}
