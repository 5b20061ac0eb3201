// Storefront widget: "visually similar" products and "search by photo" on a shop's own pages.
//   <script src="https://search.example.com/widget.js" defer></script>
//   <div data-visualsearch-similar="SKU" data-top-k="6"></div>
//   <div data-visualsearch-search></div>
// It runs under the shop's origin and calls this app's read API cross-origin, so the app's
// VISUALSEARCH_CORS_ORIGINS must list the shop's origin. API data only ever goes into
// textContent and attributes, never HTML; styles live in each element's shadow root.
(() => {
  "use strict";
  const script = document.currentScript || document.querySelector('script[src*="/widget.js"]');
  if (!script || window.VisualSearchWidget) return;
  // The app may be served under a path prefix: resolve everything against the script's folder.
  const base = new URL(".", script.src);
  const MAX_TOP_K = 100;
  const CSS = `
:host { display: block; }
.heading { font-size: 1.15em; margin: 0 0 .5em; }
.button { font: inherit; padding: .5em 1em; border: 0; border-radius: 6px; cursor: pointer;
  background: var(--visualsearch-accent, #0066cc); color: #fff; }
.button:disabled { opacity: .6; cursor: default; }
.status { margin: .5em 0; color: #6e6e73; }
.status:empty { display: none; }
.status.error { color: #b00020; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 12px; }
.card { display: flex; flex-direction: column; gap: 4px; padding: 8px; border: 1px solid #d2d2d7;
  border-radius: 8px; background: #fff; color: inherit; text-decoration: none; }
.card:hover, .card:focus-visible { border-color: var(--visualsearch-accent, #0066cc); }
.image { width: 100%; aspect-ratio: 1; object-fit: contain; }
.title { font-weight: 600; }
.price { color: #6e6e73; }`;
  let sheet = null;

  function addStyles(root) {
    // A constructed stylesheet needs no 'unsafe-inline' in the shop's Content-Security-Policy.
    if ("adoptedStyleSheets" in Document.prototype && "replaceSync" in CSSStyleSheet.prototype) {
      if (!sheet) { sheet = new CSSStyleSheet(); sheet.replaceSync(CSS); }
      root.adoptedStyleSheets = [sheet];
    } else {
      const style = document.createElement("style");
      style.textContent = CSS;
      root.append(style);
    }
  }

  function el(tag, name, text) {
    const node = document.createElement(tag);
    if (name) { node.className = name; node.setAttribute("part", name); }  // shops may style ::part(card)
    if (text != null) node.textContent = text;
    return node;
  }

  function options(host) {
    const params = new URLSearchParams();
    const topK = parseInt(host.dataset.topK, 10);
    params.set("top_k", String(Number.isFinite(topK) ? Math.min(Math.max(topK, 1), MAX_TOP_K) : 6));
    if (host.dataset.category) params.set("category", host.dataset.category);
    return params;
  }

  function productLink(hit) {
    try {
      const url = new URL(hit.url);
      if (url.protocol === "https:" || url.protocol === "http:") return url.href;
    } catch (_) { /* no url, or not an absolute one */ }
    return new URL(`products/${encodeURIComponent(hit.sku)}`, base).href;
  }

  function card(hit) {
    const link = el("a", "card");
    link.href = productLink(hit);
    const image = el("img", "image");
    image.src = new URL(hit.image_url, base).href;
    image.alt = "";
    image.loading = "lazy";
    link.append(image, el("span", "title", hit.title || hit.sku));
    if (typeof hit.price === "number") link.append(el("span", "price", hit.price.toFixed(2)));
    return link;
  }

  async function fetchResults(url, options) {
    let response;
    try {
      response = await fetch(url, { credentials: "omit", ...options });
    } catch (_) {
      // A refused CORS check and a network failure look the same to a script.
      console.warn(`visualsearch widget: no answer from ${url.origin}; does its VISUALSEARCH_CORS_ORIGINS `
                   + `list this page's origin, ${location.origin}?`);
      throw new Error("Visual search is unavailable right now.");
    }
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      throw new Error((data && data.error && data.error.message) || `Visual search failed (HTTP ${response.status}).`);
    }
    if (!data || !Array.isArray(data.results)) throw new Error("Visual search sent an unexpected answer.");
    return data.results;
  }

  function frame(host, heading) {
    const root = host.attachShadow({ mode: "open" });
    addStyles(root);
    const box = el("section", "widget");
    const status = el("p", "status");
    status.setAttribute("role", "status");
    const grid = el("div", "grid");
    if (heading) box.append(el("h2", "heading", heading));
    box.append(status, grid);
    root.append(box);
    return { status, grid };
  }

  async function show(view, load) {
    view.status.classList.remove("error");
    try {
      const results = await load();
      view.grid.replaceChildren(...results.map(card));
      view.status.textContent = results.length ? "" : "No similar products found.";
    } catch (err) {
      view.grid.replaceChildren();
      view.status.textContent = err.message;
      view.status.classList.add("error");
    }
  }

  function similar(host) {
    const sku = host.dataset.visualsearchSimilar;
    if (!sku) return;
    const view = frame(host, host.dataset.heading ?? "Visually similar");
    view.status.textContent = "Loading…";
    const url = new URL(`api/v1/products/${encodeURIComponent(sku)}/similar`, base);
    url.search = options(host);
    show(view, () => fetchResults(url));
  }

  function photoSearch(host) {
    const view = frame(host, host.dataset.heading);
    const button = el("button", "button", host.dataset.label || "Search by photo");
    button.type = "button";
    // No capture attribute: phones offer the camera and the photo gallery.
    const input = el("input");
    input.type = "file";
    input.accept = "image/*";
    input.hidden = true;
    view.status.before(button, input);
    button.addEventListener("click", () => input.click());
    input.addEventListener("change", async () => {
      const file = input.files[0];
      input.value = "";  // picking the same photo again searches again
      if (!file) return;
      const body = new FormData();
      body.append("image", file, file.name || "photo");
      for (const [name, value] of options(host)) body.append(name, value);
      button.disabled = true;
      view.status.textContent = "Searching…";
      await show(view, () => fetchResults(new URL("api/v1/search", base), { method: "POST", body }));
      button.disabled = false;
    });
  }

  function mount(root = document) {
    const widgets = [["[data-visualsearch-similar]", similar], ["[data-visualsearch-search]", photoSearch]];
    for (const [selector, start] of widgets) {
      for (const host of root.querySelectorAll(selector)) {
        if (host.shadowRoot) continue;  // mounted already
        try { start(host); } catch (err) { console.warn("visualsearch widget:", err); }
      }
    }
  }

  window.VisualSearchWidget = { mount };  // for content added later: VisualSearchWidget.mount(element)
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => mount());
  else mount();
})();
