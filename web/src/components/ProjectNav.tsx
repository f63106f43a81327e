import { useRef, useState } from "react";
import { useAppState, useStore } from "../hooks";
import { Dialog } from "./Dialog";

export function ProjectNav() {
  const store = useStore();
  const { projects, projectId } = useAppState();
  const [creating, setCreating] = useState(false);
  const [name, setName] = useState("");
  const opener = useRef<HTMLButtonElement>(null);

  const create = async () => {
    if (!name.trim()) return;
    if (await store.createProject(name.trim())) {
      setCreating(false);
      setName("");
    }
  };

  return (
    <nav aria-label="Projects" className="projects">
      <h2>Projects</h2>
      <ul>
        {projects.items.map((project) => (
          <li key={project.id}>
            <button
              type="button"
              className="nav-item"
              aria-current={project.id === projectId ? "page" : undefined}
              onClick={() => void store.openProject(project.id)}
            >
              {project.name}
            </button>
          </li>
        ))}
      </ul>
      {projects.loaded && projects.items.length === 0 && <p className="empty">No projects yet.</p>}
      {projects.next && (
        <button type="button" className="more" onClick={() => void store.loadMoreProjects()}>
          More projects
        </button>
      )}
      <button type="button" ref={opener} onClick={() => setCreating(true)}>
        New project
      </button>
      {creating && (
        <Dialog title="New project" onClose={() => setCreating(false)} returnFocus={opener}>
          <form
            onSubmit={(e) => {
              e.preventDefault();
              void create();
            }}
          >
            <label htmlFor="project-name">Project name</label>
            <input id="project-name" value={name} onChange={(e) => setName(e.target.value)} required maxLength={200} />
            <div className="actions">
              <button type="submit">Create</button>
              <button type="button" onClick={() => setCreating(false)}>
                Cancel
              </button>
            </div>
          </form>
        </Dialog>
      )}
    </nav>
  );
}
