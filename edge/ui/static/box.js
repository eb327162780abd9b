// Box tool of the part page: drag a rectangle on the frame; its corners, in frame pixels, go into
// the review form's hidden box_x/box_y/box_w/box_h fields (the corrected defect mask).
(function () {
  const area = document.getElementById("box-area");
  const img = document.getElementById("box-img");
  const rect = document.getElementById("box-rect");
  if (!area || !img || !rect) return;
  const W = Number(area.dataset.width), H = Number(area.dataset.height);
  let start = null;
  function framePoint(ev) {
    const r = img.getBoundingClientRect();
    const x = Math.min(Math.max(ev.clientX - r.left, 0), r.width);
    const y = Math.min(Math.max(ev.clientY - r.top, 0), r.height);
    return { x: x, y: y, sx: W / r.width, sy: H / r.height };
  }
  function draw(a, b) {
    const left = Math.min(a.x, b.x), top = Math.min(a.y, b.y);
    const w = Math.abs(a.x - b.x), h = Math.abs(a.y - b.y);
    Object.assign(rect.style, { left: left + "px", top: top + "px", width: w + "px", height: h + "px" });
    rect.hidden = w < 2 || h < 2;
    const fx = Math.floor(left * a.sx), fy = Math.floor(top * a.sy);
    const fw = Math.max(0, Math.min(W - fx, Math.round(w * a.sx))), fh = Math.max(0, Math.min(H - fy, Math.round(h * a.sy)));
    const ok = !rect.hidden && fw > 0 && fh > 0;
    document.getElementById("box_x").value = ok ? fx : "";
    document.getElementById("box_y").value = ok ? fy : "";
    document.getElementById("box_w").value = ok ? fw : "";
    document.getElementById("box_h").value = ok ? fh : "";
  }
  area.addEventListener("mousedown", function (ev) { start = framePoint(ev); ev.preventDefault(); });
  window.addEventListener("mousemove", function (ev) { if (start) draw(start, framePoint(ev)); });
  window.addEventListener("mouseup", function (ev) { if (start) { draw(start, framePoint(ev)); start = null; } });
})();
