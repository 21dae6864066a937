// The bt dashboard: Jobs, Job, Workers and Submit pages over the coordinator's gRPC-web API.
// Hash routes (#/jobs, #/job/ID, #/workers, #/submit): the coordinator serves only "/".
import "./style.css";
import { client, errorText, getToken, isAuthError, isTerminal, setToken, stateName } from "./api";
import { JobState, WorkerState, type Job, type EvalResult, type TrainMetrics, type CorrelationPicture } from "./gen/bt/v1/jobs_pb";
import { Curves } from "./curves";

// ---------- small DOM helpers ----------

type Child = Node | string | number | null | undefined | false;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | ((e: Event) => void)> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (typeof v === "function") el.addEventListener(k.replace(/^on/, ""), v);
    else if (v === true) el.setAttribute(k, "");
    else if (v !== false) el.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function age(ms: bigint | number): string {
  const s = Math.max(0, Math.round((Date.now() - Number(ms)) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function num(v: number, digits = 4): string {
  if (!Number.isFinite(v)) return String(v);
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return v.toFixed(digits).replace(/\.?0+$/, "") || "0";
}

function pct(v: number): string {
  return `${(v * 100).toFixed(1)} %`;
}

function stateBadge(s: JobState): HTMLElement {
  return h("span", { class: `state state-${stateName(s)}` }, stateName(s));
}

const banner = document.getElementById("banner") as HTMLElement;
function showError(e: unknown): void {
  banner.textContent = errorText(e);
  banner.hidden = false;
}
function clearError(): void {
  banner.hidden = true;
}

// ---------- routing: each page returns a cleanup function ----------

type Page = (main: HTMLElement, arg: string) => () => void;
let cleanup: () => void = () => {};

function route(): void {
  cleanup();
  clearError();
  const main = document.getElementById("main") as HTMLElement;
  main.replaceChildren();
  const [, name = "jobs", arg = ""] = location.hash.split("/").map(decodeURIComponent);
  const pages: Record<string, Page> = { jobs: jobsPage, job: jobPage, workers: workersPage, submit: submitPage };
  const page = pages[name] ?? jobsPage;
  for (const a of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    a.classList.toggle("active", a.dataset.nav === (name === "job" ? "jobs" : name));
  }
  cleanup = page(main, arg);
}

/** Calls `f` now and every `ms` until stopped; errors go to the banner. */
function poll(ms: number, f: () => Promise<void>): () => void {
  let stopped = false;
  let timer: number | undefined;
  const run = async () => {
    try {
      await f();
      if (!stopped) clearError();
    } catch (e) {
      if (!stopped) showError(e);
    }
    if (!stopped) timer = window.setTimeout(run, ms);
  };
  void run();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}

// ---------- Jobs ----------

const FILTERS: [string, JobState[]][] = [
  ["all", []],
  ["active", [JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING, JobState.RESTARTING]],
  ...[
    JobState.QUEUED,
    JobState.SCHEDULED,
    JobState.RUNNING,
    JobState.RESTARTING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
  ].map((s): [string, JobState[]] => [stateName(s), [s]]),
];

function jobsPage(main: HTMLElement): () => void {
  const saved = sessionStorage.getItem("bt.filter") ?? "all";
  const select = h("select", { id: "state-filter" }, ...FILTERS.map(([n]) => h("option", { value: n, selected: n === saved }, n)));
  const body = h("tbody");
  const count = h("span", { class: "muted" });
  main.append(
    h("h1", {}, "Jobs ", count),
    h("label", {}, "State ", select),
    h(
      "table",
      { id: "jobs" },
      h("thead", {}, h("tr", {}, ...["Job", "Name", "State", "Progress", "Loss", "Images/s", "Owner", "Age"].map((c) => h("th", {}, c)))),
      body,
    ),
  );
  const load = async () => {
    const states = (FILTERS.find(([n]) => n === select.value) ?? FILTERS[0])[1];
    const { jobs } = await client.listJobs({ states, limit: 500 });
    count.textContent = `(${jobs.length})`;
    body.replaceChildren(
      ...jobs.map((j) => {
        const m = j.lastMetrics;
        const total = Number(j.totalSteps || m?.totalSteps || 0n);
        const step = Number(m?.step ?? 0n);
        return h(
          "tr",
          { "data-job": j.id },
          h("td", {}, h("a", { href: `#/job/${j.id}` }, j.id)),
          h("td", {}, j.name),
          h("td", {}, stateBadge(j.state)),
          h("td", {}, total ? `${step}/${total}` : step ? String(step) : "–", total ? h("progress", { max: String(total), value: String(step) }) : null),
          h("td", {}, m ? num(m.loss) : "–"),
          h("td", {}, m ? num(m.imagesPerSec, 1) : "–"),
          h("td", {}, j.owner || "–"),
          h("td", { title: new Date(Number(j.createdAtMs)).toISOString() }, age(j.createdAtMs)),
        );
      }),
    );
    if (!jobs.length) body.append(h("tr", {}, h("td", { colspan: "8", class: "muted" }, "no jobs")));
  };
  let stop = poll(2000, load);
  select.addEventListener("change", () => {
    sessionStorage.setItem("bt.filter", select.value);
    stop();
    stop = poll(2000, load);
  });
  return () => stop();
}

// ---------- Job ----------

function evalRows(evals: EvalResult[]): HTMLElement {
  if (!evals.length) return h("p", { class: "muted" }, "no evaluations yet");
  return h(
    "table",
    { id: "evals" },
    h("thead", {}, h("tr", {}, ...["Step", "Kind", "Top-1", "Top-5", "Random-init baseline", "Raw pixels", "Margin", "Detail"].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      ...evals.map((e) =>
        h(
          "tr",
          {},
          h("td", {}, String(e.step)),
          h("td", {}, e.kind),
          h("td", {}, pct(e.top1)),
          h("td", {}, e.top5 ? pct(e.top5) : "–"),
          h("td", {}, e.baselineTop1 ? pct(e.baselineTop1) : "not measured"),
          h("td", {}, e.rawPixelsTop1 ? pct(e.rawPixelsTop1) : "not measured"),
          h("td", { class: e.hasBaselines ? (e.margin > 0 ? "good" : "bad") : "" }, e.hasBaselines ? `${e.margin >= 0 ? "+" : ""}${(e.margin * 100).toFixed(1)} pts` : "–"),
          h("td", { class: "detail" }, e.detail),
        ),
      ),
    ),
  );
}

// ---------- the |C| heatmap ----------

/** A few stops of a dark-to-bright colour map (0: |C_ij| = 0, 1: |C_ij| = 1). */
const STOPS: [number, number, number][] = [
  [13, 8, 135],
  [126, 3, 168],
  [204, 71, 120],
  [248, 149, 64],
  [240, 249, 33],
];
const PALETTE: [number, number, number][] = Array.from({ length: 256 }, (_, v) => {
  const x = (v / 255) * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2);
  const t = x - i;
  const [a, b] = [STOPS[i], STOPS[i + 1]];
  return [0, 1, 2].map((c) => Math.round(a[c] + (b[c] - a[c]) * t)) as [number, number, number];
});

/** The latest |C| picture of a job, drawn cell by cell, with its diagonal's and off-diagonal's means. */
class Heatmap {
  readonly root: HTMLElement;
  private canvas = h("canvas", { id: "heatmap", width: "256", height: "256", class: "heatmap" }) as HTMLCanvasElement;
  private caption = h("dl", { class: "summary", id: "heatmap-stats" });

  constructor() {
    this.root = h(
      "div",
      { class: "heatmap-box" },
      this.canvas,
      h("div", {}, h("p", { class: "muted" }, "|C| of the latest picture step (dark: 0, bright: 1); a converged run shows a bright diagonal on a dark field."), this.caption),
    );
    this.caption.append(h("dt", {}, "Picture"), h("dd", {}, "none yet"));
  }

  draw(p: CorrelationPicture): void {
    const side = p.side;
    if (!side || p.cells.length !== side * side) return;
    const ctx = this.canvas.getContext("2d");
    if (!ctx) return;
    const img = ctx.createImageData(side, side);
    for (let i = 0; i < side * side; i++) {
      const [r, g, b] = PALETTE[p.cells[i]];
      img.data.set([r, g, b, 255], i * 4);
    }
    // Drawn at its size on a scratch canvas, then scaled up without smoothing (one block per cell).
    const scratch = document.createElement("canvas");
    scratch.width = side;
    scratch.height = side;
    scratch.getContext("2d")?.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(scratch, 0, 0, this.canvas.width, this.canvas.height);
    this.canvas.dataset.step = String(p.step);
    this.caption.replaceChildren(
      ...[
        ["Step", String(p.step)],
        ["Mean C_ii", num(p.meanDiag)],
        ["Mean |C_ij|, i ≠ j", num(p.meanAbsOffDiag)],
        ["Cells", `${side} × ${side}`],
      ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    );
  }
}

/** The spec `btctl eval CHECKPOINT` submits: a linear probe of one checkpoint. */
function probeSpec(checkpoint: string): string {
  // A JSON string is a TOML basic string (same escapes for quotes, backslashes and controls).
  return `kind = "linear_probe"\nname = "probe"\n[eval]\ncheckpoint = ${JSON.stringify(checkpoint)}\n`;
}

function jobPage(main: HTMLElement, id: string): () => void {
  const stateEl = h("span", { id: "job-state" });
  const summary = h("dl", { class: "summary" });
  const failure = h("pre", { id: "failure", class: "error", hidden: true });
  const placement = h("div");
  const history = h("ol", { id: "history" });
  const notices = h("ul", { id: "notices" });
  const evals = h("div");
  const checkpoints = h("div");
  const cancel = h("button", { id: "cancel", class: "danger" }, "Cancel job");
  const streamState = h("span", { class: "muted", id: "stream-state" });
  const curves = new Curves();
  const heatmap = new Heatmap();
  const logs = new LogPanel(id);
  main.append(
    h("h1", {}, "Job ", h("code", {}, id), " ", stateEl, " ", cancel),
    h("p", {}, "Follow it from a terminal: ", h("code", { id: "watch-cmd" }, `btctl watch ${id}`)),
    failure,
    summary,
    h("h2", {}, "Curves ", streamState),
    curves.root,
    h("h2", {}, "Cross-correlation matrix"),
    heatmap.root,
    h("h2", {}, "Evaluations"),
    evals,
    h("div", { class: "cols" }, h("section", {}, h("h2", {}, "State history"), history, notices), h("section", {}, h("h2", {}, "Placement"), placement)),
    h("h2", {}, "Checkpoints"),
    checkpoints,
    h("h2", {}, "Logs ", logs.state),
    logs.root,
  );
  let job: Job | undefined;
  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${id}?`)) return;
    try {
      job = await client.cancelJob({ jobId: id, reason: "cancelled from the dashboard" });
      render();
    } catch (e) {
      showError(e);
    }
  });
  const render = () => {
    if (!job) return;
    const j = job;
    stateEl.replaceChildren(stateBadge(j.state));
    cancel.hidden = isTerminal(j.state);
    failure.hidden = !j.failureReason;
    failure.textContent = j.failureReason;
    const m = j.lastMetrics;
    const items: [string, string][] = [
      ["Name", j.name],
      ["Kind", j.kind],
      ["Owner", j.owner || "–"],
      ["World size", String(j.worldSize)],
      ["Progress", `${m?.step ?? 0n}/${j.totalSteps}`],
      ["Loss", m ? num(m.loss) : "–"],
      ["Images/s", m ? num(m.imagesPerSec, 1) : "–"],
      ["Attempt", `${j.attempts} (restarts ${j.restartsUsed}/${j.maxRestarts}, preemptions ${j.preemptions})`],
      ["Created", `${new Date(Number(j.createdAtMs)).toLocaleString()} (${age(j.createdAtMs)} ago)`],
    ];
    if (j.pendingReason) items.push(["Waiting", j.pendingReason]);
    summary.replaceChildren(...items.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    placement.replaceChildren(
      j.placement.length
        ? h(
            "table",
            { id: "placement" },
            h("thead", {}, h("tr", {}, ...["Rank", "Worker", "Host", "Device"].map((c) => h("th", {}, c)))),
            h("tbody", {}, ...j.placement.map((p) => h("tr", {}, h("td", {}, p.rank), h("td", {}, p.workerName || p.workerId), h("td", {}, p.host), h("td", {}, p.device)))),
          )
        : h("p", { class: "muted" }, "not placed"),
    );
    evals.replaceChildren(evalRows(j.evals));
  };
  const startProbe = async (path: string) => {
    if (!confirm(`Start a linear probe of ${path}?`)) return;
    try {
      const probe = await client.submitJob({ specToml: probeSpec(path) });
      location.hash = `#/job/${probe.id}`;
    } catch (e) {
      showError(e);
    }
  };
  const stopJob = poll(2000, async () => {
    job = await client.getJob({ jobId: id });
    render();
  });
  const stopCkpt = poll(5000, async () => {
    const { checkpoints: list } = await client.listCheckpoints({ jobId: id });
    checkpoints.replaceChildren(
      list.length
        ? h(
            "table",
            { id: "checkpoints" },
            h("thead", {}, h("tr", {}, ...["Step", "Epoch", "Size", "Created", "Eval", "Probe top-1", "Path", ""].map((c) => h("th", {}, c)))),
            h(
              "tbody",
              {},
              ...list.map((c) =>
                h(
                  "tr",
                  {},
                  h("td", {}, String(c.step)),
                  h("td", {}, c.epoch),
                  h("td", {}, `${(Number(c.sizeBytes) / 1048576).toFixed(1)} MiB`),
                  h("td", {}, `${age(c.createdAtMs)} ago`),
                  h("td", {}, c.evalState || "–", c.evalJobId ? " " : null, c.evalJobId ? h("a", { href: `#/job/${c.evalJobId}` }, c.evalJobId) : null),
                  h("td", {}, c.eval && c.evalState === "done" ? pct(c.eval.top1) : "–"),
                  h("td", {}, h("code", {}, c.path)),
                  h("td", {}, c.evalState ? null : h("button", { class: "probe", "data-step": String(c.step), onclick: () => void startProbe(c.path) }, "Linear probe")),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, "no checkpoints yet"),
    );
  });

  // WatchJob: replay from step 0, then follow; on a dropped stream, reconnect from the last step
  // seen (events already seen are skipped by sequence number).
  const abort = new AbortController();
  let lastSeq = -1n;
  let lastStep = 0n;
  const watch = async () => {
    let delay = 500;
    while (!abort.signal.aborted) {
      try {
        streamState.textContent = "(live)";
        for await (const ev of client.watchJob({ jobId: id, fromStep: lastStep, follow: true }, { signal: abort.signal })) {
          delay = 500;
          if (ev.seq <= lastSeq) continue;
          lastSeq = ev.seq;
          if (ev.step > lastStep) lastStep = ev.step;
          const when = new Date(Number(ev.timeMs)).toLocaleTimeString();
          switch (ev.kind.case) {
            case "metrics":
              curves.add(ev.kind.value as TrainMetrics);
              break;
            case "state": {
              const s = ev.kind.value;
              history.append(h("li", {}, h("span", { class: "muted" }, when), " ", stateBadge(s.state), s.reason ? ` ${s.reason}` : "", s.epoch ? h("span", { class: "muted" }, ` (attempt epoch ${s.epoch})`) : null));
              break;
            }
            case "notice":
              notices.append(h("li", { class: `notice-${ev.kind.value.level}` }, h("span", { class: "muted" }, when), ` ${ev.kind.value.level}: ${ev.kind.value.message}`));
              break;
            case "picture":
              heatmap.draw(ev.kind.value);
              break;
            case "missed":
              notices.append(h("li", { class: "notice-warn missed" }, h("span", { class: "muted" }, when), ` Missed ${ev.kind.value.count} events (this page fell behind the stream)`));
              break;
            default:
              break; // evals and checkpoints: the polled job and checkpoint list show them
          }
        }
        // The stream ends when the job does.
        if (job && isTerminal(job.state)) break;
        const j = await client.getJob({ jobId: id });
        if (isTerminal(j.state)) break;
      } catch (e) {
        if (abort.signal.aborted) return;
        if (isAuthError(e)) showError(e);
        streamState.textContent = `(reconnecting: ${errorText(e)})`;
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
    if (!abort.signal.aborted) streamState.textContent = "(ended)";
  };
  void watch();
  logs.start();
  return () => {
    abort.abort();
    logs.stop();
    stopJob();
    stopCkpt();
    curves.destroy();
  };
}

// ---------- Logs: every rank's trainer lines, like `btctl logs -f` ----------

class LogPanel {
  readonly root: HTMLElement;
  readonly state = h("span", { class: "muted", id: "logs-state" });
  private readonly pre = h("pre", { id: "logs", class: "logs" });
  private readonly rank = h("select", { id: "logs-rank" }, h("option", { value: "" }, "every rank"));
  private readonly ranks = new Set<number>();
  private abort = new AbortController();
  private lastSeq = 0n;
  /** Lines kept on the page; older ones scroll away. */
  private static readonly KEEP = 2000;

  constructor(private readonly jobId: string) {
    this.root = h("div", {}, h("label", {}, "Rank ", this.rank), this.pre);
    this.rank.addEventListener("change", () => {
      this.stop();
      this.pre.replaceChildren();
      this.lastSeq = 0n;
      this.start();
    });
  }

  start(): void {
    this.abort = new AbortController();
    void this.follow(this.abort.signal);
  }

  stop(): void {
    this.abort.abort();
  }

  private async follow(signal: AbortSignal): Promise<void> {
    const only = this.rank.value === "" ? [] : [Number(this.rank.value)];
    let delay = 500;
    while (!signal.aborted) {
      try {
        this.state.textContent = "(live)";
        // The first time the last 500 lines, after a drop only what came since.
        const tail = this.lastSeq === 0n ? 500 : 0;
        for await (const l of client.streamLogs({ jobId: this.jobId, ranks: only, tail, follow: true }, { signal })) {
          delay = 500;
          if (l.seq <= this.lastSeq) continue;
          this.lastSeq = l.seq;
          this.add(l.rank, l.text);
        }
        break; // the stream ends when the job does
      } catch (e) {
        if (signal.aborted) return;
        this.state.textContent = `(reconnecting: ${errorText(e)})`;
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
    if (!signal.aborted) this.state.textContent = this.pre.childElementCount ? "(ended)" : "(no lines)";
  }

  private add(rank: number, text: string): void {
    if (!this.ranks.has(rank)) {
      this.ranks.add(rank);
      this.rank.append(h("option", { value: String(rank) }, `rank ${rank}`));
    }
    const atEnd = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 4;
    this.pre.append(h("div", { class: "log-line" }, h("span", { class: "muted" }, `[rank ${rank}] `), text));
    while (this.pre.childElementCount > LogPanel.KEEP) this.pre.firstElementChild?.remove();
    if (atEnd) this.pre.scrollTop = this.pre.scrollHeight;
  }
}

// ---------- Workers ----------

function workersPage(main: HTMLElement): () => void {
  const body = h("tbody");
  main.append(
    h("h1", {}, "Workers"),
    h("table", { id: "workers" }, h("thead", {}, h("tr", {}, ...["Worker", "Host", "State", "Devices", "Busy", "Last heartbeat", "Drained", "Health"].map((c) => h("th", {}, c)))), body),
  );
  return poll(2000, async () => {
    const { workers } = await client.listWorkers({});
    body.replaceChildren(
      ...workers.map((w) =>
        h(
          "tr",
          {},
          h("td", { title: w.id }, w.name || w.id),
          h("td", {}, w.host),
          h("td", {}, h("span", { class: `state worker-${(WorkerState[w.state] ?? "").toLowerCase()}` }, (WorkerState[w.state] ?? String(w.state)).toLowerCase())),
          h("td", {}, w.devices.map((d) => `${d.kind}:${d.index}${d.name ? ` (${d.name})` : ""}`).join(", ")),
          h("td", {}, `${w.busyDevices}/${w.devices.length}`),
          h("td", {}, w.lastSeenMs ? `${age(w.lastSeenMs)} ago` : "never"),
          h("td", { class: w.drained ? "" : "muted" }, w.drained || "–"),
          h("td", { class: w.unhealthy || w.featuresOff.length ? "" : "muted" }, workerHealth(w)),
        ),
      ),
    );
    if (!workers.length) body.append(h("tr", {}, h("td", { colspan: "8", class: "muted" }, "no workers")));
  });
}

/** An unhealthy worker's reason, and the protocol features off for a daemon one version behind. */
function workerHealth(w: { unhealthy: string; featuresOff: string[]; protocolVersion: number }): string {
  const notes: string[] = [];
  if (w.unhealthy) notes.push(`unhealthy: ${w.unhealthy}`);
  if (w.featuresOff.length) notes.push(`protocol ${w.protocolVersion}, off: ${w.featuresOff.join(", ")}`);
  return notes.join("; ") || "ok";
}

// ---------- Submit ----------

function submitPage(main: HTMLElement): () => void {
  const spec = h("textarea", { id: "spec", rows: "24", cols: "80", spellcheck: "false", placeholder: "name = \"my-job\"\nworld_size = 1\n[data]\n…" }) as HTMLTextAreaElement;
  spec.value = sessionStorage.getItem("bt.spec") ?? "";
  const error = h("pre", { id: "submit-error", class: "error", hidden: true });
  const button = h("button", { id: "submit", type: "submit" }, "Submit job");
  const upload = h("input", { id: "spec-file", type: "file", accept: ".toml,text/plain" }) as HTMLInputElement;
  upload.addEventListener("change", async () => {
    const f = upload.files?.[0];
    if (f) spec.value = await f.text();
  });
  const form = h(
    "form",
    { id: "submit-form" },
    h("p", {}, "Paste a job spec (the TOML ", h("code", {}, "btctl submit"), " takes) or load it from a file: ", upload),
    spec,
    h("div", {}, button),
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem("bt.spec", spec.value);
    button.disabled = true;
    error.hidden = true;
    try {
      const job = await client.submitJob({ specToml: spec.value });
      location.hash = `#/job/${job.id}`;
    } catch (err) {
      error.textContent = errorText(err);
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  main.append(h("h1", {}, "Submit a job"), form);
  return () => {};
}

// ---------- token and start ----------

const tokenInput = document.getElementById("token") as HTMLInputElement;
const tokenState = document.getElementById("token-state") as HTMLElement;
const showTokenState = () => {
  tokenState.textContent = getToken() ? "saved" : "none";
};
tokenInput.value = getToken();
showTokenState();
document.getElementById("token-form")?.addEventListener("submit", (e) => {
  e.preventDefault();
  setToken(tokenInput.value.trim());
  showTokenState();
  route();
});
window.addEventListener("hashchange", route);
route();
