// Upload page: pick / drop / paste a photo, optionally drag a crop box, POST it to the API.
(() => {
  const form = document.getElementById("search-form");
  const drop = document.getElementById("drop");
  // "Take a photo" (camera) and "Choose a photo" (gallery, or any file on a desktop).
  const pickers = [document.getElementById("camera"), document.getElementById("file")];
  const preview = document.getElementById("preview");
  const previewWrap = document.getElementById("preview-wrap");
  const cropBox = document.getElementById("crop-box");
  const cropField = document.getElementById("crop");
  const cropHint = document.getElementById("crop-hint");
  const submit = document.getElementById("submit");
  const statusLine = document.getElementById("status");
  const results = document.getElementById("results");
  let photo = null;

  function setStatus(text, isError = false) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", isError);
  }

  function usePhoto(file) {
    if (!file) return;
    if (!file.type.startsWith("image/") && !/\.(heic|heif|avif)$/i.test(file.name)) {
      setStatus(`${file.name} is not an image.`, true);
      return;
    }
    photo = file;
    clearCrop();
    preview.src = URL.createObjectURL(file);
    previewWrap.hidden = false;
    cropHint.hidden = false;
    submit.disabled = false;
    form.requestSubmit();
  }

  for (const input of pickers) {
    input.addEventListener("change", () => {
      const file = input.files[0];
      input.value = "";  // picking the same photo again searches again
      usePhoto(file);
    });
  }
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    usePhoto(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.kind === "file");
    if (item) usePhoto(item.getAsFile());
  });

  // Crop: drag a rectangle over the preview; sent as x,y,w,h in the photo's own pixels.
  let start = null;
  function clearCrop() { cropField.value = ""; cropBox.hidden = true; }
  document.getElementById("clear-crop").addEventListener("click", () => { clearCrop(); form.requestSubmit(); });
  function point(e) {
    const r = preview.getBoundingClientRect();
    return { x: Math.min(Math.max(e.clientX - r.left, 0), r.width), y: Math.min(Math.max(e.clientY - r.top, 0), r.height) };
  }
  previewWrap.addEventListener("pointerdown", (e) => { start = point(e); previewWrap.setPointerCapture(e.pointerId); });
  previewWrap.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = point(e);
    Object.assign(cropBox.style, {
      left: `${Math.min(start.x, p.x)}px`, top: `${Math.min(start.y, p.y)}px`,
      width: `${Math.abs(p.x - start.x)}px`, height: `${Math.abs(p.y - start.y)}px`,
    });
    cropBox.hidden = false;
  });
  previewWrap.addEventListener("pointerup", (e) => {
    if (!start) return;
    const p = point(e);
    const r = preview.getBoundingClientRect();
    const sx = preview.naturalWidth / r.width, sy = preview.naturalHeight / r.height;
    const w = Math.abs(p.x - start.x), h = Math.abs(p.y - start.y);
    if (w > 8 && h > 8) {
      cropField.value = [Math.min(start.x, p.x) * sx, Math.min(start.y, p.y) * sy, w * sx, h * sy]
        .map(Math.round).join(",");
      form.requestSubmit();
    } else {
      clearCrop();
    }
    start = null;
  });

  function card(hit) {
    const a = document.createElement("a");
    a.className = "card";
    a.href = `/products/${encodeURIComponent(hit.sku)}`;
    const img = document.createElement("img");
    img.src = hit.image_url; img.alt = ""; img.loading = "lazy";
    const title = document.createElement("span");
    title.className = "title"; title.textContent = hit.title || hit.sku;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${hit.price != null ? hit.price.toFixed(2) + " · " : ""}score ${hit.score.toFixed(2)}`;
    a.append(img, title, meta);
    return a;
  }

  form.addEventListener("change", (e) => { if (photo && !pickers.includes(e.target)) form.requestSubmit(); });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!photo) return;
    const body = new FormData(form);
    body.set("image", photo, photo.name || "photo");
    // "colour=red, size=M|L": each NAME=VALUE becomes a form field the API filters on.
    for (const pair of document.getElementById("attribute-filters").value.split(/[,;]/)) {
      const at = pair.indexOf("=");
      if (at > 0 && pair.slice(at + 1).trim()) body.append(pair.slice(0, at).trim(), pair.slice(at + 1).trim());
    }
    submit.disabled = true;
    setStatus("Searching…");
    try {
      const response = await fetch("/api/v1/search", { method: "POST", body });
      const data = await response.json();
      if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
      results.replaceChildren(...data.results.map(card));
      setStatus(data.results.length
        ? `${data.results.length} similar products in ${Math.round(data.took_ms.total)} ms`
        : "No products match these filters.");
    } catch (err) {
      results.replaceChildren();
      setStatus(`Search failed: ${err.message}`, true);
    } finally {
      submit.disabled = false;
    }
  });
})();
