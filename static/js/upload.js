/* Drag-and-drop for the image upload form (no library, no network).
 *
 * The form works without this script: the <input type=file multiple> is a normal file picker.
 * With it, the input's surrounding box also accepts dropped files: they are put into the SAME
 * input through a DataTransfer, so the browser submits them exactly as if picked. The chosen
 * file names and sizes are listed under the box either way.
 */
(function () {
  "use strict";

  function formatSize(bytes) {
    if (bytes < 1024) return bytes + " B";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(0) + " KB";
    return (bytes / (1024 * 1024)).toFixed(1) + " MB";
  }

  function setUp(zone) {
    var input = zone.querySelector('input[type="file"]');
    var list = zone.querySelector("[data-file-list]");
    var hint = zone.querySelector("[data-dropzone-hint]");
    if (!input) return;
    zone.classList.add("dropzone-js");
    if (hint) hint.hidden = false;

    function showFiles() {
      if (!list) return;
      list.textContent = "";
      var files = input.files || [];
      for (var i = 0; i < files.length; i++) {
        var li = document.createElement("li");
        var name = document.createElement("span");
        name.className = "file-name";
        name.textContent = files[i].name;
        var size = document.createElement("span");
        size.className = "file-size";
        size.textContent = formatSize(files[i].size);
        li.appendChild(name);
        li.appendChild(size);
        list.appendChild(li);
      }
      var max = parseInt(zone.getAttribute("data-max-files"), 10);
      if (max && files.length > max) {
        var warning = document.createElement("li");
        warning.className = "file-list-warning";
        warning.textContent = "You chose " + files.length + " files; at most " + max +
          " can be uploaded at once. Upload them in smaller batches.";
        list.insertBefore(warning, list.firstChild);
      }
      zone.classList.toggle("has-files", files.length > 0);
      zone.setAttribute("data-count", String(files.length));
    }

    function hasFiles(event) {
      var types = event.dataTransfer && event.dataTransfer.types;
      if (!types) return false;
      for (var i = 0; i < types.length; i++) if (types[i] === "Files") return true;
      return false;
    }

    var depth = 0;
    zone.addEventListener("dragenter", function (event) {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth += 1;
      zone.classList.add("is-dragover");
    });
    zone.addEventListener("dragover", function (event) {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    zone.addEventListener("dragleave", function () {
      depth = Math.max(0, depth - 1);
      if (depth === 0) zone.classList.remove("is-dragover");
    });
    zone.addEventListener("drop", function (event) {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth = 0;
      zone.classList.remove("is-dragover");
      var dropped = event.dataTransfer.files;
      if (typeof DataTransfer === "function") {
        var transfer = new DataTransfer();
        for (var i = 0; i < dropped.length; i++) transfer.items.add(dropped[i]);
        input.files = transfer.files;
      } else {
        input.files = dropped; // older browsers accept a FileList directly
      }
      input.dispatchEvent(new Event("change", { bubbles: true }));
    });
    input.addEventListener("change", showFiles);
    showFiles(); // a reloaded page may keep the selection
  }

  // Dropping a file next to the zone must not navigate away from the form.
  ["dragover", "drop"].forEach(function (type) {
    window.addEventListener(type, function (event) {
      var target = event.target;
      var inZone = target && target.closest && target.closest("[data-dropzone]");
      if (event.dataTransfer && !inZone) event.preventDefault();
    });
  });

  document.querySelectorAll("[data-dropzone]").forEach(setUp);
})();
