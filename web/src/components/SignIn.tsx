import { useId, useState, type FormEvent } from "react";
import { useAppState, useStore } from "../hooks";

export function SignIn({ notice }: { notice: string | null }) {
  const store = useStore();
  const { authError, authBusy } = useAppState();
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const emailId = useId();
  const passwordId = useId();

  const submit = (event: FormEvent) => {
    event.preventDefault();
    void store.signIn(email, password);
  };

  return (
    <main className="signin">
      <h1>Threadline</h1>
      <form onSubmit={submit} aria-label="Sign in" aria-busy={authBusy}>
        {notice && <p className="notice">{notice}</p>}
        <label htmlFor={emailId}>Email</label>
        <input
          id={emailId}
          type="email"
          autoComplete="username"
          required
          value={email}
          onChange={(e) => setEmail(e.target.value)}
        />
        <label htmlFor={passwordId}>Password</label>
        <input
          id={passwordId}
          type="password"
          autoComplete="current-password"
          required
          minLength={1}
          value={password}
          onChange={(e) => setPassword(e.target.value)}
        />
        <div className="actions">
          <button type="submit" disabled={authBusy}>
            Sign in
          </button>
          <button
            type="button"
            disabled={authBusy}
            onClick={() => void store.register(email, password)}
          >
            Create account
          </button>
        </div>
        {authError && (
          <div role="alert" className="alert inline" key={authError.id}>
            <p>{authError.text}</p>
            {authError.requestId && (
              <p className="request-id">
                Request ID for support: <code>{authError.requestId}</code>
              </p>
            )}
          </div>
        )}
      </form>
    </main>
  );
}
