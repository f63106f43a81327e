// REST over the cookie session: same-origin credentials, X-CSRF-Token from the tl_csrf cookie
// on unsafe methods, and every non-2xx answer turned into an ApiError carrying the envelope.
import type {
  BodyOf,
  ErrorBody,
  LoginResult,
  Message,
  MessagePage,
  Project,
  ProjectPage,
  Thread,
  ThreadPage,
  User,
} from "./types";

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly requestId: string | null;
  readonly details: Record<string, unknown>;

  constructor(status: number, body: ErrorBody) {
    super(body.message);
    this.name = "ApiError";
    this.status = status;
    this.code = body.code;
    this.requestId = body.request_id;
    this.details = body.details;
  }
}

/** The network did not answer (offline, server down): nothing is known to have happened. */
export class NetworkError extends Error {
  constructor(cause: unknown) {
    super("The server could not be reached. Check your connection.");
    this.name = "NetworkError";
    this.cause = cause;
  }
}

export function readCookie(name: string, cookies: string = globalThis.document?.cookie ?? ""): string | null {
  for (const part of cookies.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

function isErrorEnvelope(value: unknown): value is { error: ErrorBody } {
  if (typeof value !== "object" || value === null || !("error" in value)) return false;
  const error: unknown = value.error;
  return (
    typeof error === "object" &&
    error !== null &&
    "code" in error &&
    typeof error.code === "string" &&
    "message" in error &&
    typeof error.message === "string"
  );
}

type Method = "GET" | "POST" | "PATCH" | "DELETE";

export interface RequestOptions {
  body?: unknown;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

export type Fetch = (input: string, init: RequestInit) => Promise<Response>;

/** One typed call per REST operation the client uses. */
export class Api {
  private readonly fetchImpl: Fetch;
  private readonly base: string;

  constructor(fetchImpl: Fetch = (input, init) => globalThis.fetch(input, init), base = "/api/v1") {
    this.fetchImpl = fetchImpl;
    this.base = base;
  }

  private async call<T>(method: Method, path: string, options: RequestOptions = {}): Promise<T> {
    const headers: Record<string, string> = { Accept: "application/json", ...options.headers };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET") {
      const csrf = readCookie("tl_csrf");
      if (csrf) headers["X-CSRF-Token"] = csrf;
    }
    let response: Response;
    try {
      response = await this.fetchImpl(this.base + path, {
        method,
        headers,
        credentials: "same-origin",
        body: options.body === undefined ? null : JSON.stringify(options.body),
        signal: options.signal ?? null,
      });
    } catch (cause) {
      throw new NetworkError(cause);
    }
    if (response.status === 204) return undefined as T;
    let parsed: unknown;
    try {
      parsed = await response.json();
    } catch {
      parsed = null;
    }
    if (!response.ok) {
      const body: ErrorBody = isErrorEnvelope(parsed)
        ? parsed.error
        : {
            code: response.status >= 500 ? "internal" : "bad_request",
            message: `The server answered ${response.status}.`,
            request_id: response.headers.get("X-Request-ID"),
            details: {},
          };
      throw new ApiError(response.status, body);
    }
    return parsed as T;
  }

  me(): Promise<{ user: User }> {
    return this.call("GET", "/auth/me");
  }
  register(body: BodyOf<"/api/v1/auth/register", "post">): Promise<{ user: User }> {
    return this.call("POST", "/auth/register", { body });
  }
  login(body: BodyOf<"/api/v1/auth/login", "post">): Promise<LoginResult> {
    return this.call("POST", "/auth/login", { body });
  }
  logout(): Promise<void> {
    return this.call("POST", "/auth/logout");
  }

  listProjects(cursor: string | null, limit = 50): Promise<ProjectPage> {
    return this.call("GET", `/projects?${page(cursor, limit)}`);
  }
  getProject(id: string): Promise<Project> {
    return this.call("GET", `/projects/${enc(id)}`);
  }
  createProject(body: BodyOf<"/api/v1/projects", "post">): Promise<Project> {
    return this.call("POST", "/projects", { body });
  }
  listThreads(projectId: string, cursor: string | null, limit = 50): Promise<ThreadPage> {
    return this.call("GET", `/projects/${enc(projectId)}/threads?${page(cursor, limit)}`);
  }
  createThread(
    projectId: string,
    body: BodyOf<"/api/v1/projects/{project_id}/threads", "post">,
  ): Promise<Thread> {
    return this.call("POST", `/projects/${enc(projectId)}/threads`, { body });
  }
  getThread(id: string): Promise<Thread> {
    return this.call("GET", `/threads/${enc(id)}`);
  }
  /** The `limit` messages just before `beforeSeq` (ascending), or the page `cursor` names. */
  listMessages(
    threadId: string,
    query: { beforeSeq?: number; cursor?: string | null; limit?: number },
  ): Promise<MessagePage> {
    const params = new URLSearchParams({ limit: String(query.limit ?? 100) });
    if (query.cursor) params.set("cursor", query.cursor);
    else if (query.beforeSeq !== undefined) params.set("before_seq", String(query.beforeSeq));
    return this.call("GET", `/threads/${enc(threadId)}/messages?${params.toString()}`);
  }
  sendMessage(
    threadId: string,
    body: BodyOf<"/api/v1/threads/{thread_id}/messages", "post">,
  ): Promise<Message> {
    return this.call("POST", `/threads/${enc(threadId)}/messages`, { body });
  }
  getMessage(id: string): Promise<Message> {
    return this.call("GET", `/messages/${enc(id)}`);
  }
  editMessage(id: string, content: string, expectedVersion: number): Promise<Message> {
    const body: BodyOf<"/api/v1/messages/{message_id}", "patch"> = { content };
    return this.call("PATCH", `/messages/${enc(id)}`, {
      body,
      headers: { "If-Match": String(expectedVersion) },
    });
  }
  deleteMessage(id: string, expectedVersion: number): Promise<Message> {
    return this.call("DELETE", `/messages/${enc(id)}`, {
      headers: { "If-Match": String(expectedVersion) },
    });
  }
}

function enc(id: string): string {
  return encodeURIComponent(id);
}

function page(cursor: string | null, limit: number): string {
  const params = new URLSearchParams({ limit: String(limit) });
  if (cursor) params.set("cursor", cursor);
  return params.toString();
}

/** Words for a person, with the request id for support when there is one. */
export function describeError(error: unknown, doing: string): { text: string; requestId: string | null } {
  if (error instanceof ApiError) {
    const friendly: Record<string, string> = {
      unauthorized: "Your session has ended. Please sign in again.",
      rate_limited: "Too many requests right now. Please wait a moment and try again.",
      budget_exceeded: "This project's monthly budget is spent, so the assistant cannot reply.",
      payload_too_large: "That is too long to send.",
      unavailable: "The server is busy or restarting. Please try again shortly.",
      internal: "Something went wrong on the server.",
    };
    const text = friendly[error.code] ?? error.message;
    return { text: `${doing} failed: ${text}`, requestId: error.requestId };
  }
  if (error instanceof NetworkError) return { text: `${doing} failed: ${error.message}`, requestId: null };
  return { text: `${doing} failed.`, requestId: null };
}
