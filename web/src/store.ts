// The application's state and everything that changes it, outside React. Components read it
// with useSyncExternalStore (hooks.ts) and call its methods; they never open sockets or fetch.
// One Store per tab owns the tab's one WebSocket (connection.ts).
import { Announcer, type Clock, realClock } from "./announcer";
import { Api, ApiError, describeError } from "./api/http";
import type { Message, Project, Thread, User } from "./api/types";
import { Connection, ConnectionLost, RequestFailed, type ConnectionStatus, type NetworkWatch, type SocketFactory } from "./connection";
import type { ThreadEvent } from "./protocol";
import * as T from "./thread";

export type AuthState =
  | { status: "unknown" }
  | { status: "signedOut"; notice: string | null }
  | { status: "signedIn"; user: User };

export interface Notice {
  id: number;
  text: string;
  requestId: string | null;
}

export interface ListState<I> {
  items: readonly I[];
  next: string | null;
  loading: boolean;
  loaded: boolean;
}

export interface State {
  auth: AuthState;
  authError: Notice | null;
  authBusy: boolean;
  projects: ListState<Project>;
  projectId: string | null;
  threads: ListState<Thread>;
  threadId: string | null;
  thread: T.ThreadState | null;
  loadingOlder: boolean;
  connection: ConnectionStatus;
  alert: Notice | null;
  /** The polite live region's text (whole sentences of the streaming reply). */
  announcement: string;
  /** Bumped when focus should go to the composer (a thread was opened). */
  focusComposer: number;
}

const emptyList = <I>(): ListState<I> => ({ items: [], next: null, loading: false, loaded: false });

export interface StoreDeps {
  api?: Api;
  socketFactory?: SocketFactory;
  socketUrl?: string;
  network?: NetworkWatch;
  history?: Pick<History, "pushState"> & { addEventListener?: (type: "popstate", fn: () => void) => void };
  location?: { pathname: string };
  clock?: Clock;
  newId?: () => string;
}

export const PAGE = { messages: 100, projects: 50, threads: 50 };

function route(pathname: string): { projectId: string | null; threadId: string | null } {
  const match = /^\/p\/([^/]+)(?:\/t\/([^/]+))?\/?$/.exec(pathname);
  return { projectId: match?.[1] ?? null, threadId: match?.[2] ?? null };
}

export class Store {
  private state: State;
  private readonly listeners = new Set<() => void>();
  readonly api: Api;
  private readonly connection: Connection;
  private readonly announcer: Announcer;
  private readonly deps: StoreDeps;
  private readonly newId: () => string;
  private noticeId = 0;
  private started = false;
  private threadToken = 0;
  private spendTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(deps: StoreDeps = {}) {
    this.deps = deps;
    this.api = deps.api ?? new Api();
    this.newId = deps.newId ?? (() => crypto.randomUUID());
    this.state = {
      auth: { status: "unknown" },
      authError: null,
      authBusy: false,
      projects: emptyList(),
      projectId: null,
      threads: emptyList(),
      threadId: null,
      thread: null,
      loadingOlder: false,
      connection: "idle",
      alert: null,
      announcement: "",
      focusComposer: 0,
    };
    const clock = deps.clock ?? realClock;
    this.announcer = new Announcer((text) => this.set({ announcement: text }), clock);
    this.connection = new Connection({
      url: deps.socketUrl ?? "/ws",
      socketFactory: deps.socketFactory ?? ((url) => new WebSocket(url)),
      ...(deps.network ? { network: deps.network } : {}),
      onOpen: () => this.resubscribe(),
      onEvent: (event) => this.onEvent(event),
      onStatus: (connection) => this.set({ connection }),
      onSessionLost: (reason) => void this.checkSession(reason),
    });
  }

  // -- the external-store interface ------------------------------------------------------

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getSnapshot = (): State => this.state;

  private set(patch: Partial<State>): void {
    this.state = { ...this.state, ...patch };
    for (const listener of this.listeners) listener();
  }

  private notice(text: string, requestId: string | null): Notice {
    this.noticeId += 1;
    return { id: this.noticeId, text, requestId };
  }

  private fail(error: unknown, doing: string): void {
    if (error instanceof ApiError && error.status === 401) {
      this.signedOut("Your session has ended. Please sign in again.");
      return;
    }
    if (error instanceof RequestFailed) error = new ApiError(0, error.body);
    const { text, requestId } =
      error instanceof ConnectionLost
        ? { text: `${doing} failed: the connection to the server was lost. Try again when it is back.`, requestId: null }
        : describeError(error, doing);
    this.set({ alert: this.notice(text, requestId) });
  }

  dismissAlert(): void {
    this.set({ alert: null });
  }

  // -- session --------------------------------------------------------------------------

  /** Find out whether the browser has a session. Safe to call more than once. */
  start(): void {
    if (this.started) return;
    this.started = true;
    this.deps.history?.addEventListener?.("popstate", () => void this.followLocation());
    void this.checkSession(null);
  }

  private async checkSession(reason: "closed_4001" | "handshake_failed" | null): Promise<void> {
    try {
      const { user } = await this.api.me();
      if (this.state.auth.status !== "signedIn") await this.signedIn(user);
      else if (reason === "closed_4001") this.connection.start();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this.signedOut(reason ? "Your session has ended. Please sign in again." : null);
      } else if (this.state.auth.status === "unknown") {
        this.set({ auth: { status: "signedOut", notice: null } });
        this.fail(error, "Checking your session");
      }
    }
  }

  private async signedIn(user: User): Promise<void> {
    this.set({ auth: { status: "signedIn", user }, authError: null });
    this.connection.start();
    await this.loadProjects();
    await this.followLocation();
  }

  private signedOut(notice: string | null): void {
    this.connection.stop();
    this.announcer.clear();
    this.threadToken += 1;
    this.set({
      auth: { status: "signedOut", notice },
      projects: emptyList(),
      threads: emptyList(),
      projectId: null,
      threadId: null,
      thread: null,
      alert: null,
      announcement: "",
    });
  }

  async signIn(email: string, password: string): Promise<void> {
    this.set({ authBusy: true, authError: null });
    try {
      const result = await this.api.login({ email, password });
      await this.signedIn(result.user);
    } catch (error) {
      const { text, requestId } = describeError(error, "Signing in");
      this.set({ authError: this.notice(text, requestId) });
    } finally {
      this.set({ authBusy: false });
    }
  }

  async register(email: string, password: string): Promise<void> {
    this.set({ authBusy: true, authError: null });
    try {
      await this.api.register({ email, password });
      const result = await this.api.login({ email, password });
      await this.signedIn(result.user);
    } catch (error) {
      const { text, requestId } = describeError(error, "Creating the account");
      this.set({ authError: this.notice(text, requestId) });
    } finally {
      this.set({ authBusy: false });
    }
  }

  async signOut(): Promise<void> {
    try {
      await this.api.logout();
    } catch {
      // Signed out locally either way; the cookie may already be gone.
    }
    this.deps.history?.pushState(null, "", "/");
    this.signedOut(null);
  }

  // -- projects and threads -------------------------------------------------------------

  loadMoreProjects(): Promise<void> {
    return this.loadProjects(true);
  }

  async loadProjects(more = false): Promise<void> {
    const current = this.state.projects;
    if (current.loading || (more && !current.next)) return;
    this.set({ projects: { ...current, loading: true } });
    try {
      const page = await this.api.listProjects(more ? current.next : null, PAGE.projects);
      const items = more ? [...current.items, ...page.items.filter((p) => !current.items.some((q) => q.id === p.id))] : page.items;
      this.set({ projects: { items, next: page.next_cursor, loading: false, loaded: true } });
    } catch (error) {
      this.set({ projects: { ...this.state.projects, loading: false } });
      this.fail(error, "Loading projects");
    }
  }

  async createProject(name: string): Promise<boolean> {
    try {
      const project = await this.api.createProject({ name });
      this.set({ projects: { ...this.state.projects, items: [...this.state.projects.items, project] } });
      await this.openProject(project.id);
      return true;
    } catch (error) {
      this.fail(error, "Creating the project");
      return false;
    }
  }

  async openProject(projectId: string, threadId: string | null = null, push = true): Promise<void> {
    if (push) this.deps.history?.pushState(null, "", `/p/${projectId}`);
    if (this.state.projectId !== projectId) {
      this.closeThread();
      this.set({ projectId, threads: { ...emptyList<Thread>(), loading: true } });
      try {
        const [page, project] = await Promise.all([
          this.api.listThreads(projectId, null, PAGE.threads),
          this.api.getProject(projectId),
        ]);
        if (this.state.projectId !== projectId) return;
        this.replaceProject(project);
        this.set({ threads: { items: page.items, next: page.next_cursor, loading: false, loaded: true } });
      } catch (error) {
        this.set({ threads: { ...this.state.threads, loading: false } });
        this.fail(error, "Opening the project");
        return;
      }
    }
    if (threadId) await this.openThread(threadId, false);
    else if (this.state.threadId) this.closeThread();
  }

  async loadMoreThreads(): Promise<void> {
    const { projectId, threads } = this.state;
    if (!projectId || !threads.next || threads.loading) return;
    this.set({ threads: { ...threads, loading: true } });
    try {
      const page = await this.api.listThreads(projectId, threads.next, PAGE.threads);
      const items = [...threads.items, ...page.items.filter((t) => !threads.items.some((u) => u.id === t.id))];
      this.set({ threads: { items, next: page.next_cursor, loading: false, loaded: true } });
    } catch (error) {
      this.set({ threads: { ...this.state.threads, loading: false } });
      this.fail(error, "Loading threads");
    }
  }

  async createThread(): Promise<void> {
    const projectId = this.state.projectId;
    if (!projectId) return;
    try {
      const thread = await this.api.createThread(projectId, { title: "" });
      this.set({ threads: { ...this.state.threads, items: [...this.state.threads.items, thread] } });
      await this.openThread(thread.id);
    } catch (error) {
      this.fail(error, "Creating the thread");
    }
  }

  private replaceProject(project: Project): void {
    const items = this.state.projects.items;
    const known = items.some((p) => p.id === project.id);
    this.set({
      projects: { ...this.state.projects, items: known ? items.map((p) => (p.id === project.id ? project : p)) : [...items, project] },
    });
  }

  private async followLocation(): Promise<void> {
    if (this.state.auth.status !== "signedIn") return;
    const { projectId, threadId } = route(this.deps.location?.pathname ?? "/");
    if (projectId) await this.openProject(projectId, threadId, false);
  }

  // -- the open thread --------------------------------------------------------------------

  private closeThread(): void {
    const old = this.state.threadId;
    this.threadToken += 1;
    this.announcer.clear();
    if (old && this.connection.status === "connected") {
      this.connection.request("unsubscribe", { thread_id: old }).catch(() => undefined);
    }
    this.set({ threadId: null, thread: null, announcement: "", loadingOlder: false });
  }

  async openThread(threadId: string, push = true): Promise<void> {
    if (push && this.state.projectId) this.deps.history?.pushState(null, "", `/p/${this.state.projectId}/t/${threadId}`);
    if (this.state.threadId === threadId && this.state.thread) {
      this.set({ focusComposer: this.state.focusComposer + 1 });
      return;
    }
    this.closeThread();
    const token = this.threadToken;
    this.set({ threadId, focusComposer: this.state.focusComposer + 1 });
    try {
      // 1. Where the log stands; 2. live events from there on; 3. the latest page up to it.
      const thread = await this.api.getThread(threadId);
      if (token !== this.threadToken) return;
      this.set({ thread: T.emptyThread(threadId, thread.last_seq) });
      this.subscribeOpenThread();
      const page = await this.api.listMessages(threadId, { beforeSeq: thread.last_seq + 1, limit: PAGE.messages });
      if (token !== this.threadToken) return;
      this.updateThread((s) => T.applyPage(s, page.items, page.next_cursor, false));
    } catch (error) {
      if (token === this.threadToken) this.fail(error, "Opening the thread");
    }
  }

  async loadOlder(): Promise<void> {
    const thread = this.state.thread;
    if (!thread || !thread.olderCursor || this.state.loadingOlder) return;
    const token = this.threadToken;
    this.set({ loadingOlder: true });
    try {
      const page = await this.api.listMessages(thread.threadId, { cursor: thread.olderCursor, limit: PAGE.messages });
      if (token !== this.threadToken) return;
      this.updateThread((s) => T.applyPage(s, page.items, page.next_cursor, true));
    } catch (error) {
      this.fail(error, "Loading older messages");
    } finally {
      if (token === this.threadToken) this.set({ loadingOlder: false });
    }
  }

  private updateThread(change: (state: T.ThreadState) => T.ThreadState): void {
    const thread = this.state.thread;
    if (!thread) return;
    const next = change(thread);
    if (next !== thread) this.set({ thread: next });
  }

  private subscribeOpenThread(): void {
    const thread = this.state.thread;
    if (!thread || this.connection.status !== "connected") return;
    const token = this.threadToken;
    this.connection.request("subscribe", { thread_id: thread.threadId, after_seq: thread.lastSeq }).catch((error: unknown) => {
      if (token === this.threadToken && !(error instanceof ConnectionLost)) {
        this.fail(error, "Following the thread");
      }
    });
  }

  /** Every (re)open of the socket: resume the open thread after the last seq we hold. */
  private resubscribe(): void {
    this.subscribeOpenThread();
  }

  private onEvent(event: ThreadEvent): void {
    const thread = this.state.thread;
    if (!thread || event.thread_id !== thread.threadId) return;
    const next = T.applyEvent(thread, event);
    if (next === thread) return;
    this.set({ thread: next });
    if (event.type === "assistant.started" || event.type === "assistant.delta") {
      const id = event.data.message_id;
      const stream = next.streams[id];
      if (stream) this.announcer.update(id, stream.text);
    } else if (event.type === "assistant.completed" || event.type === "assistant.failed") {
      this.announcer.complete(event.data.message_id, event.data.content);
      this.refreshSpendSoon();
    }
  }

  private refreshSpendSoon(): void {
    if (this.spendTimer !== null) return;
    this.spendTimer = setTimeout(() => {
      this.spendTimer = null;
      const projectId = this.state.projectId;
      if (!projectId) return;
      this.api.getProject(projectId).then(
        (project) => this.replaceProject(project),
        () => undefined,
      );
    }, 300);
  }

  // -- sending, editing, deleting, stopping -----------------------------------------------

  /** Optimistic send: shown at once, reconciled by client_msg_id when the server confirms. */
  send(content: string): void {
    const thread = this.state.thread;
    if (!thread || !content.trim()) return;
    const clientMsgId = this.newId();
    this.updateThread((s) => T.addLocal(s, clientMsgId, content));
    void this.deliver(thread.threadId, clientMsgId, content);
  }

  /** Resend a "Not sent" message with the same client_msg_id (idempotent on the server). */
  retry(clientMsgId: string): void {
    const thread = this.state.thread;
    const local = thread?.locals.find((l) => l.clientMsgId === clientMsgId);
    if (!thread || !local) return;
    this.updateThread((s) => T.addLocal(s, clientMsgId, local.content));
    void this.deliver(thread.threadId, clientMsgId, local.content);
  }

  private async deliver(threadId: string, clientMsgId: string, content: string): Promise<void> {
    try {
      const message = await this.api.sendMessage(threadId, { content, client_msg_id: clientMsgId, reply: true });
      if (this.state.thread?.threadId === threadId) this.updateThread((s) => T.applyMessage(s, message));
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return this.fail(error, "Sending");
      const { text, requestId } = describeError(error, "Sending");
      if (this.state.thread?.threadId === threadId) this.updateThread((s) => T.failLocal(s, clientMsgId, text, requestId));
    }
  }

  /** Edit at the version the editor was opened with; a conflict shows the latest text. */
  async edit(message: Message, content: string, expectedVersion: number): Promise<boolean> {
    try {
      const updated = await this.api.editMessage(message.id, content, expectedVersion);
      this.updateThread((s) => T.applyMessage(s, updated));
      return true;
    } catch (error) {
      await this.onWriteConflict(error, message, "Saving the edit");
      return false;
    }
  }

  async remove(message: Message): Promise<void> {
    try {
      const tombstone = await this.api.deleteMessage(message.id, message.version);
      this.updateThread((s) => T.applyMessage(s, tombstone));
    } catch (error) {
      await this.onWriteConflict(error, message, "Deleting the message");
    }
  }

  private async onWriteConflict(error: unknown, message: Message, doing: string): Promise<void> {
    if (error instanceof ApiError && (error.code === "version_conflict" || error.code === "conflict")) {
      let latest: Message | null = null;
      try {
        latest = await this.api.getMessage(message.id);
        this.updateThread((s) => T.applyMessage(s, latest as Message));
      } catch {
        // The alert still says what happened; live events will bring the latest text.
      }
      const text =
        latest?.deleted === true
          ? "This message was deleted elsewhere before your change was saved."
          : "This message was changed elsewhere before your change was saved. It now shows the latest text; edit it again if you still want to.";
      this.set({ alert: this.notice(text, error.requestId) });
      return;
    }
    this.fail(error, doing);
  }

  /** Stop the reply being generated in the open thread (its partial text stays). */
  async stop(): Promise<void> {
    const thread = this.state.thread;
    if (!thread) return;
    try {
      await this.connection.request("cancel", { thread_id: thread.threadId });
    } catch (error) {
      this.fail(error, "Stopping the reply");
    }
  }
}
