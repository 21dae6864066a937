// Bundles src/app.ts (and the CSS it imports) into dist/, with index.html. `--check`: build into a
// temporary folder and fail if dist/ differs (the coordinator embeds the committed dist/).
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const check = process.argv.includes("--check");
const out = check ? mkdtempSync(join(tmpdir(), "bt-dashboard-")) : "dist";
mkdirSync(out, { recursive: true });
await esbuild.build({
  entryPoints: ["src/app.ts"],
  bundle: true,
  minify: true,
  format: "iife",
  target: "es2020",
  outdir: out,
  logLevel: "warning",
  legalComments: "eof",
});
copyFileSync("index.html", join(out, "index.html"));
if (check) {
  const files = ["index.html", "app.js", "app.css"];
  const stale = files.filter((f) => {
    try {
      return !readFileSync(join(out, f)).equals(readFileSync(join("dist", f)));
    } catch {
      return true;
    }
  });
  const extra = readdirSync(out).filter((f) => !files.includes(f));
  rmSync(out, { recursive: true, force: true });
  if (stale.length || extra.length) {
    console.error(`dashboard/dist is stale (${[...stale, ...extra].join(", ")}): run \`npm run build\` in dashboard/ and commit dist/`);
    process.exit(1);
  }
  console.log("dashboard/dist is up to date");
}
