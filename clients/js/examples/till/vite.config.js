// Builds the example till into dist/ with the package's browser build.
import { defineConfig } from "vite";
import { fileURLToPath } from "node:url";

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  logLevel: "warn",
  resolve: { alias: { "@pos-hub/client": fileURLToPath(new URL("../../dist/browser.js", import.meta.url)) } },
  build: { outDir: "dist", emptyOutDir: true },
});
