// The answer page: follow the two streams of one run from where the page left off.
import { subscribe } from "../durable_streams/durable-streams.js";

const page = document.querySelector("[data-workflow]");
const workflowId = page.dataset.workflow;
const answer = document.getElementById("answer");
const connection = document.getElementById("connection");
const bar = document.getElementById("progress-bar");
const stage = document.getElementById("stage");
const counter = document.getElementById("counter");

const STAGES = { thinking: "Thinking…", writing: "Writing", done: "Done" };
const heartbeat = Number(page.dataset.heartbeat) || undefined;
let lastStage = page.dataset.stage;
let answerState = "connecting";
let lost = false; // the connection went silent, and no new one has opened yet
let stoppedAs = null; // "CANCELLED" or "ERROR" once the run was interrupted

// The pill says what the reader sees: a cancelled run is not "complete", even with its
// answer stream closed, and a silent connection is not "live".
function showState(state) {
  answerState = state;
  if (state === "lost") lost = true;
  else if (state === "open" || state === "closed" || state === "failed") lost = false;
  let text = {
    open: "live", interrupted: "interrupted", waiting: "reconnecting…", closed: "complete", failed: "unavailable",
  }[state] || state;
  if (lost) text = "connection lost";
  else if (stoppedAs && (state === "interrupted" || state === "closed")) {
    text = stoppedAs === "CANCELLED" ? "cancelled" : "failed";
  }
  connection.dataset.state = lost ? "lost" : state;
  connection.textContent = text;
}

function showOutcome(text, status) {
  const badge = document.querySelector(".runs li.current .status");
  if (badge) {
    badge.textContent = text;
    badge.className = `status status-${status}`;
  }
}

function showProgress(progress) {
  lastStage = progress.stage;
  // The workflow wrote this, so it runs (the page may have been rendered before it started).
  if (progress.stage === "done") showOutcome("Success", "success");
  else showOutcome("Running", "running");
  stage.textContent = STAGES[progress.stage] || progress.stage;
  if (progress.total) {
    bar.style.width = `${Math.round((100 * progress.done) / progress.total)}%`;
    counter.textContent = `${progress.done} / ${progress.total} tokens`;
  }
}

// Exposed for the browser tests, and for the curious in the console.
window.durableDemo = {
  answer: subscribe(workflowId, "answer", {
    // The server rendered the first values; ask only for the ones after them.
    offset: Number(page.dataset.answerOffset),
    onEntry(token) {
      answer.textContent += token;
    },
    onClose() {
      answer.classList.add("done");
    },
    onStatus: showState,
    heartbeat,
    onError(error) {
      answer.classList.add("done");
      stage.textContent = error.message;
    },
  }),
  progress: subscribe(workflowId, "progress", {
    offset: Number(page.dataset.progressOffset),
    heartbeat,
    onEntry(progress) {
      page.classList.remove("stopped"); // resumed after an interruption
      if (stoppedAs) {
        stoppedAs = null;
        showState(answerState);
      }
      showProgress(progress);
    },
    onInterrupted({ status }) {
      // Cancelled or failed: not the end, if an operator resumes the run.
      stage.textContent = "Stopped before the end";
      page.classList.add("stopped");
      stoppedAs = status;
      showState(answerState);
      showOutcome(status === "CANCELLED" ? "Cancelled" : "Error", status.toLowerCase());
    },
  }),
};
