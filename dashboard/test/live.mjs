// Drives the Job page of a running job in headless Chromium (tests/tests/dashboard.rs starts a real
// coordinator and daemon). Usage: node test/live.mjs URL TOKEN JOB_ID TOTAL_STEPS
// Checks the live curves, the |C| heatmap, a checkpoint row and its Linear probe button, the
// trainer's log lines; then,
// once the job has ended, times a fresh load of its page until every point is drawn.
// Prints one line per check; exits 1 on the first failure (with the page's console and a
// screenshot in $BT_BROWSER_ARTIFACTS when set).
import { writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, token, jobId, totalSteps] = process.argv.slice(2);
if (!totalSteps) {
  console.error("usage: live.mjs URL TOKEN JOB_ID TOTAL_STEPS");
  process.exit(2);
}
const executablePath = process.env.BT_CHROMIUM ?? "/usr/bin/chromium";
const artifacts = process.env.BT_BROWSER_ARTIFACTS;
const T = 60000;

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
const logs = [];
page.on("console", (m) => logs.push(`console.${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));

async function check(name, f) {
  try {
    await f();
    console.log(`ok: ${name}`);
  } catch (e) {
    console.log(`FAILED: ${name}: ${e.message.split("\n")[0]}`);
    console.log(logs.join("\n"));
    if (artifacts) await page.screenshot({ path: `${artifacts}/failure.png`, fullPage: true }).catch(() => {});
    await browser.close();
    process.exit(1);
  }
}

const points = async () => Number((await page.locator("#curves").getAttribute("data-points")) ?? 0);

await check("the Job page of the queued job opens with the token", async () => {
  await page.goto(url);
  await page.evaluate((t) => localStorage.setItem("bt.token", t), token);
  await page.goto(`${url}#/job/${jobId}`);
  await page.locator("#job-state .state", { hasText: "queued" }).waitFor({ timeout: T });
  await page.locator(".summary dd", { hasText: "needs 1 devices" }).waitFor({ timeout: T });
  // The test starts the daemon now: every step arrives while the page is open.
  if (artifacts) writeFileSync(`${artifacts}/page-open`, "");
});

await check("its curves gain points as steps arrive", async () => {
  await page.waitForFunction(() => Number(document.querySelector("#curves")?.getAttribute("data-points") ?? 0) > 0, null, { timeout: T });
  const first = await points();
  await page.waitForFunction((n) => Number(document.querySelector("#curves")?.getAttribute("data-points") ?? 0) > n, first, { timeout: T });
  console.log(`   points: ${first} then ${await points()}`);
});

await check("the |C| heatmap shows non-uniform pixels, with its means beside it", async () => {
  await page.waitForFunction(() => document.querySelector("#heatmap")?.dataset.step, null, { timeout: T });
  const distinct = await page.evaluate(() => {
    const c = document.querySelector("#heatmap");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length; i += 4) seen.add(`${d[i]},${d[i + 1]},${d[i + 2]}`);
    return seen.size;
  });
  if (distinct < 3) throw new Error(`only ${distinct} distinct colours`);
  const stats = await page.locator("#heatmap-stats").innerText();
  if (!stats.includes("Mean C_ii")) throw new Error(`stats: ${stats}`);
  console.log(`   heatmap: ${distinct} distinct colours`);
});

await check("a checkpoint row appears, with a Linear probe button", async () => {
  await page.locator("#checkpoints button.probe").first().waitFor({ timeout: T });
});

if (artifacts) await page.screenshot({ path: `${artifacts}/job-live.png`, fullPage: true });

await check("the job runs to its end on the page", async () => {
  await page.locator("#job-state .state", { hasText: "succeeded" }).waitFor({ timeout: 240000 });
});

await check("the Logs panel shows the trainer's lines, through to its end", async () => {
  await page.locator("#logs .log-line", { hasText: "trainer finished" }).waitFor({ timeout: T });
  const n = await page.locator("#logs .log-line").count();
  const ranks = await page.locator("#logs-rank option").count();
  if (ranks < 2) throw new Error(`rank selector has ${ranks} options`);
  console.log(`   logs: ${n} lines`);
});

await check(`a fresh load draws all ${totalSteps} points of the finished job`, async () => {
  // From a blank page: the app's assets, the calls and the drawing all count.
  await page.goto("about:blank");
  const t0 = Date.now();
  await page.goto(`${url}#/job/${jobId}`);
  await page.waitForFunction((n) => Number(document.querySelector("#curves")?.getAttribute("data-points") ?? 0) >= n, Number(totalSteps), { timeout: T });
  await page.locator("#heatmap[data-step]").waitFor({ timeout: T });
  const ms = Date.now() - t0;
  console.log(`   job page with ${await points()} points drawn in ${ms} ms${ms > 1000 ? " (over the 1 s target)" : ""}`);
});

if (artifacts) await page.screenshot({ path: `${artifacts}/job.png`, fullPage: true });

let probeId = "";
await check("Linear probe on a checkpoint submits a probe job and opens it", async () => {
  page.once("dialog", (d) => d.accept());
  await page.locator("#checkpoints button.probe").first().click();
  await page.waitForURL((u) => u.hash.startsWith("#/job/") && !u.hash.endsWith(jobId), { timeout: T });
  probeId = decodeURIComponent(new URL(page.url()).hash.slice("#/job/".length));
  await page.locator(".summary dd", { hasText: "linear_probe" }).waitFor({ timeout: T });
});

console.log(`probe job: ${probeId}`);
await browser.close();
