// Building and serving the example till page (Vite) and launching Debian's Chromium.
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { chromium } from "playwright-core";
import { here } from "./helpers.mjs";

export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const dist = path.join(here, "..", "examples", "till", "dist");

let built = false;
/** Builds the example till with the current dist/browser.js, once per process. */
export function buildTill() {
  if (built) return;
  built = true;
  execFileSync(process.execPath, [path.join(here, "..", "node_modules", "vite", "bin", "vite.js"), "build", path.join(here, "..", "examples", "till")], { stdio: "inherit" });
}

/** Serves the built page on loopback. */
export function serveDist() {
  const srv = http.createServer((req, res) => {
    const p = new URL(req.url, "http://x").pathname;
    const file = path.join(dist, p === "/" ? "index.html" : p);
    if (!file.startsWith(dist) || !fs.existsSync(file)) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { "content-type": file.endsWith(".js") ? "text/javascript" : "text/html" });
    res.end(fs.readFileSync(file));
  });
  srv.unref(); // a failed test must not leave the process waiting on it
  return new Promise((r) => srv.listen(0, "127.0.0.1", () => r({ srv, port: srv.address().port })));
}

export const launch = (args = []) => chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox", ...args] });

