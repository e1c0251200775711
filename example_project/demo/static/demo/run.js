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
let lastStage = page.dataset.stage;

function showState(state) {
  connection.dataset.state = state;
  connection.textContent = {
    open: "live", interrupted: "interrupted", waiting: "reconnecting…", closed: "complete", failed: "unavailable",
  }[state] || state;
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
  if (progress.stage === "done") showOutcome("Success", "success");
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
    onError(error) {
      answer.classList.add("done");
      stage.textContent = error.message;
    },
  }),
  progress: subscribe(workflowId, "progress", {
    offset: Number(page.dataset.progressOffset),
    onEntry(progress) {
      page.classList.remove("stopped"); // resumed after an interruption
      showProgress(progress);
    },
    onInterrupted({ status }) {
      // Cancelled or failed: not the end, if an operator resumes the run.
      stage.textContent = "Stopped before the end";
      page.classList.add("stopped");
      showOutcome(status === "CANCELLED" ? "Cancelled" : "Error", "error");
    },
  }),
};
