// Drives the dashboard in headless Chromium (tests/tests/dashboard.rs runs it against a real
// coordinator). Usage: node test/browser.mjs URL TOKEN JOB_ID BAD_SPEC_FILE GOOD_SPEC_FILE
// Prints one line per check; exits 1 on the first failure (with the page's console and a
// screenshot in $BT_BROWSER_ARTIFACTS when set, where each passed check also leaves one).
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, token, jobId, badSpecFile, goodSpecFile] = process.argv.slice(2);
if (!goodSpecFile) {
  console.error("usage: browser.mjs URL TOKEN JOB_ID BAD_SPEC_FILE GOOD_SPEC_FILE");
  process.exit(2);
}
const executablePath = process.env.BT_CHROMIUM ?? "/usr/bin/chromium";
const T = 15000;

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const page = await browser.newPage();
const logs = [];
page.on("console", (m) => logs.push(`console.${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));

let shot = 0;
async function check(name, f) {
  try {
    await f();
    console.log(`ok: ${name}`);
    // A screenshot of the page after each check, numbered in order.
    if (process.env.BT_BROWSER_ARTIFACTS) {
      shot += 1;
      await page.screenshot({ path: `${process.env.BT_BROWSER_ARTIFACTS}/${String(shot).padStart(2, "0")}.png` }).catch(() => {});
    }
  } catch (e) {
    console.log(`FAILED: ${name}: ${e.message.split("\n")[0]}`);
    console.log(logs.join("\n"));
    if (process.env.BT_BROWSER_ARTIFACTS) {
      await page.screenshot({ path: `${process.env.BT_BROWSER_ARTIFACTS}/failure.png`, fullPage: true }).catch(() => {});
    }
    await browser.close();
    process.exit(1);
  }
}

await check("the dashboard loads without a token and says the call needs one", async () => {
  await page.goto(url);
  await page.locator("#banner").filter({ hasText: "authentication required" }).waitFor({ timeout: T });
});

await check("with the token, the Jobs page lists the job submitted through gRPC", async () => {
  await page.fill("#token", token);
  await page.click("#token-form button");
  const row = page.locator(`#jobs tr[data-job="${jobId}"]`);
  await row.waitFor({ timeout: T });
  const state = (await row.locator(".state").innerText()).trim();
  if (state !== "queued") throw new Error(`state ${state}, expected queued`);
  if (!(await page.locator("#banner").isHidden())) throw new Error("the error banner is still shown");
});

await check("the token is kept in localStorage across a reload", async () => {
  await page.reload();
  await page.locator(`#jobs tr[data-job="${jobId}"]`).waitFor({ timeout: T });
});

await check("the state filter narrows the list", async () => {
  await page.selectOption("#state-filter", "running");
  await page.locator("#jobs td", { hasText: "no jobs" }).waitFor({ timeout: T });
  await page.selectOption("#state-filter", "all");
  await page.locator(`#jobs tr[data-job="${jobId}"]`).waitFor({ timeout: T });
});

await check("the Job page shows its state, its history from WatchJob and the btctl line", async () => {
  await page.click(`#jobs a[href="#/job/${jobId}"]`);
  await page.locator("#job-state .state", { hasText: "queued" }).waitFor({ timeout: T });
  await page.locator("#history li .state", { hasText: "queued" }).waitFor({ timeout: T });
  const cmd = await page.locator("#watch-cmd").innerText();
  if (cmd !== `btctl watch ${jobId}`) throw new Error(`watch line ${cmd}`);
});

await check("Submit with a bad spec shows the coordinator's field error inline", async () => {
  await page.click('nav a[data-nav="submit"]');
  await page.fill("#spec", readFileSync(badSpecFile, "utf8"));
  await page.click("#submit");
  const err = page.locator("#submit-error");
  await err.filter({ hasText: "train.batch_size" }).waitFor({ timeout: T });
  console.log(`   inline error: ${(await err.innerText()).trim()}`);
});

let newId = "";
await check("Submit with a good spec loaded from a file jumps to the new job", async () => {
  await page.setInputFiles("#spec-file", goodSpecFile);
  await page.waitForFunction((want) => document.querySelector("#spec")?.value === want, readFileSync(goodSpecFile, "utf8"), { timeout: T });
  await page.click("#submit");
  await page.waitForURL((u) => u.hash.startsWith("#/job/") && !u.hash.endsWith(jobId), { timeout: T });
  newId = decodeURIComponent(new URL(page.url()).hash.slice("#/job/".length));
  await page.locator("#job-state .state", { hasText: "queued" }).waitFor({ timeout: T });
});

await check("the job submitted through the UI appears in the Jobs list", async () => {
  await page.click('nav a[data-nav="jobs"]');
  await page.locator(`#jobs tr[data-job="${newId}"]`).waitFor({ timeout: T });
  await page.click(`#jobs a[href="#/job/${newId}"]`);
  await page.locator("#job-state .state", { hasText: "queued" }).waitFor({ timeout: T });
});

await check("Cancel on the Job page cancels it", async () => {
  page.once("dialog", (d) => d.accept());
  await page.click("#cancel");
  await page.locator("#job-state .state", { hasText: "cancelled" }).waitFor({ timeout: T });
});

await check("the Workers page lists the workers", async () => {
  await page.click('nav a[data-nav="workers"]');
  await page.locator("#workers td", { hasText: "no workers" }).waitFor({ timeout: T });
});

console.log(`submitted from the browser: ${newId}`);
await browser.close();
