/// <reference types="vitest/config" />
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The API server the dev server proxies to (`make run` serves it on 127.0.0.1:8000).
const api = process.env.THREADLINE_API ?? "http://127.0.0.1:8000";

export default defineConfig({
  plugins: [react()],
  build: {
    // Shipped inside the Python package: `threadline serve` serves it at / (server/webui.py).
    outDir: "../server/webdist",
    emptyOutDir: true,
    // No inline polyfill script: the CSP allows no inline script.
    modulePreload: { polyfill: false },
    sourcemap: false,
    target: "es2022",
  },
  server: {
    proxy: {
      "/api": { target: api },
      "/ws": { target: api.replace(/^http/, "ws"), ws: true },
    },
  },
  test: {
    include: ["src/**/*.test.ts", "src/**/*.test.tsx"],
    environment: "node",
  },
});
