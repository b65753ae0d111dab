// Drives the demo page in headless Chromium like a user: choose an image, type the question, press
// Ask, wait for the streamed answer. Prints one JSON line per case: the page's result (text, token ids,
// timings) and any page errors. Used by tests/runtime/test_web.py; by hand:
//
//   node test/e2e.mjs http://127.0.0.1:8000/ cases.json      cases: [{"image": PATH, "question": Q}, ...]
//
// A case without a question only decodes the image (its rgbSha256 checks the browser's decoding). A case
// {"sample": NAME, "suggestion": I} clicks the page's sample image NAME, then its I-th suggested question.
//
// Environment: CHROMIUM (default /usr/bin/chromium), MAX_NEW_TOKENS (default 16), TIMEOUT_MS (60000).
import { readFileSync } from "node:fs";

import { chromium } from "playwright-core";

const [url, casesFile] = process.argv.slice(2);
if (!url || !casesFile) {
  console.error("usage: node test/e2e.mjs SITE_URL CASES_JSON");
  process.exit(2);
}
const cases = JSON.parse(readFileSync(casesFile, "utf8"));
const timeout = Number(process.env.TIMEOUT_MS ?? 60000);
const pageUrl = new URL(url);
pageUrl.searchParams.set("max_new_tokens", process.env.MAX_NEW_TOKENS ?? "16");

// Debian's chromium, not a Playwright browser download; --no-sandbox because CI runs as root.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  const state = () => page.evaluate(() => [document.body.dataset.state, document.getElementById("status").textContent]);
  const waitFor = async (states) => {
    await page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout });
    return state();
  };

  const t0 = Date.now();
  await page.goto(pageUrl.href);
  const [loaded, status] = await waitFor(["ready", "error"]);
  const loadMs = Date.now() - t0;
  const isolated = await page.evaluate(() => globalThis.crossOriginIsolated);
  if (loaded === "error") throw new Error(`the page failed to load the model: ${status}; ${errors.join("; ")}`);

  for (const c of cases) {
    await page.evaluate(() => { window.demo.image = null; });
    if (c.sample) await page.click(`#samples button[data-image="${c.sample}"]`);
    else await page.setInputFiles("#file", c.image);
    // The image is decoded asynchronously; the Ask button is enabled once it is.
    await page.waitForFunction(() => window.demo.image || document.body.dataset.state === "error", null, { timeout });
    // SHA-256 of the decoded RGB bytes: the test compares it with Python's layout.load_image.
    const rgbSha256 = await page.evaluate(async () => {
      if (!window.demo.image) return null;
      const digest = await crypto.subtle.digest("SHA-256", window.demo.image.rgb);
      return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    });
    if (!c.question && !c.sample) { // decode only
      console.log(JSON.stringify({ ...c, rgbSha256, status: await page.textContent("#status"), errors }));
      continue;
    }
    if (c.sample) {
      await page.waitForFunction((i) => document.querySelectorAll("#suggestions button").length > i, c.suggestion,
        { timeout });
      await page.waitForFunction(() => !document.getElementById("go").disabled, null, { timeout });
      await page.click(`#suggestions button >> nth=${c.suggestion}`);
      await page.waitForFunction(() => document.body.dataset.state !== "ready", null, { timeout });
    } else {
      await page.fill("#question", c.question);
      await page.click("#go");
    }
    const [final, message] = await waitFor(["done", "error"]);
    const result = final === "done" ? JSON.parse(await page.textContent("#result")) : null;
    const shown = await page.textContent("#answer");
    const asked = await page.inputValue("#question");
    console.log(JSON.stringify({ ...c, rgbSha256, asked, state: final, status: message, shown, result, loadMs, isolated,
      errors }));
  }
} finally {
  await browser.close();
}
