// The admin's workflow page: open and interrupted streams tail live, and operator
// actions ask first.
//
// Each open stream on the page follows its WebSocket through the project's client
// (durable-streams.js) from the offset after the last entry the page rendered, so no
// entry is shown twice or skipped. Only the newest rows stay on the page.

const PREVIEW_CHARS = 160;

function confirmActions() {
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) {
        event.preventDefault();
      }
    });
  }
}

function preview(value) {
  const text = JSON.stringify(value) ?? "null";
  return text.length > PREVIEW_CHARS ? [text.slice(0, PREVIEW_CHARS), true] : [text, false];
}

function cell(className, text) {
  const td = document.createElement("td");
  if (className) {
    td.className = className;
  }
  if (text !== undefined) {
    td.textContent = text;
  }
  return td;
}

class Tail {
  constructor(panel, section) {
    this.panel = panel;
    this.body = panel.querySelector("[data-ds-entries]");
    this.scroller = panel.querySelector("[data-ds-scroll]");
    this.length = panel.querySelector("[data-ds-length]");
    this.state = panel.querySelector("[data-ds-state]");
    this.live = panel.querySelector("[data-ds-live]");
    this.next = Number(panel.dataset.nextOffset);
    this.maxRows = Number(section.dataset.maxRows) || 200;
    this.labels = {
      closed: section.dataset.closedLabel || "Closed",
      open: section.dataset.openLabel || "Open",
      interrupted: section.dataset.interruptedLabel || "Interrupted",
      justNow: section.dataset.justNowLabel || "just now",
    };
  }

  status(state) {
    // "Live" only while the socket is up; the client reconnects by itself after a drop.
    if (this.live) {
      this.live.hidden = state !== "open" && state !== "interrupted";
    }
  }

  badge(name) {
    this.state.textContent = this.labels[name];
    this.state.className = `ds-badge ds-badge-${name}`;
  }

  interrupted(length) {
    // Not closed: a resumed workflow writes on, and the tail follows.
    if (Number.isInteger(length)) {
      this.length.textContent = String(length);
    }
    this.badge("interrupted");
  }

  refused(error) {
    const note = document.createElement("p");
    note.className = "ds-quiet";
    note.textContent = error.message;
    this.panel.append(note);
  }

  entry(offset, value) {
    if (offset < this.next) {
      return;
    }
    this.next = offset + 1;
    if (this.state.classList.contains("ds-badge-interrupted")) {
      this.badge("open"); // the workflow was resumed
    }
    const atBottom =
      this.scroller.scrollTop + this.scroller.clientHeight >= this.scroller.scrollHeight - 4;
    const row = document.createElement("tr");
    row.className = "ds-fresh";
    row.dataset.offset = String(offset);
    const [text, cut] = preview(value);
    const valueCell = cell("ds-value");
    const code = document.createElement("code");
    code.textContent = text;
    valueCell.append(code);
    if (cut) {
      const more = document.createElement("span");
      more.className = "ds-cut";
      more.textContent = "…";
      valueCell.append(more);
    }
    row.append(cell("ds-num", String(offset)), cell("ds-time", this.labels.justNow), valueCell);
    this.body.append(row);
    while (this.body.rows.length > this.maxRows) {
      this.body.deleteRow(0);
    }
    this.length.textContent = String(this.next);
    this.panel.querySelector("[data-ds-empty]")?.remove();
    if (atBottom) {
      this.scroller.scrollTop = this.scroller.scrollHeight;
    }
  }

  closed(length) {
    this.panel.dataset.open = "false";
    if (Number.isInteger(length)) {
      this.length.textContent = String(length);
    }
    this.badge("closed");
    if (this.live) {
      this.live.hidden = true;
    }
  }
}

async function tailOpenStreams() {
  const section = document.getElementById("ds-streams");
  if (!section) {
    return;
  }
  const panels = [...section.querySelectorAll("[data-ds-stream][data-open='true']")];
  if (!panels.length) {
    return;
  }
  let client;
  try {
    client = await import(section.dataset.client);
  } catch (error) {
    console.warn("durable_streams: the live client could not be loaded.", error);
    return;
  }
  for (const panel of panels) {
    const tail = new Tail(panel, section);
    client.subscribe(panel.dataset.workflow, panel.dataset.key, {
      offset: tail.next,
      path: section.dataset.wsPath,
      onEntry: (value, offset) => tail.entry(offset, value),
      onClose: (length) => tail.closed(length),
      onInterrupted: ({ length }) => tail.interrupted(length),
      onStatus: (state) => tail.status(state),
      onError: (error) => tail.refused(error),
    });
  }
}

confirmActions();
tailOpenStreams();
