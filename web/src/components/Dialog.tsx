import { useEffect, useRef, type ReactNode, type RefObject } from "react";

/** A modal dialog: the native <dialog> keeps focus inside; closing returns it to the opener. */
export function Dialog({
  title,
  onClose,
  returnFocus,
  children,
}: {
  title: string;
  onClose: () => void;
  returnFocus: RefObject<HTMLElement | null>;
  children: ReactNode;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const dialog = ref.current;
    if (dialog && !dialog.open) dialog.showModal();
    const back = returnFocus.current;
    return () => {
      dialog?.close();
      back?.focus();
    };
  }, [returnFocus]);
  return (
    <dialog
      ref={ref}
      aria-labelledby="dialog-title"
      onCancel={(e) => {
        e.preventDefault();
        onClose();
      }}
    >
      <h2 id="dialog-title">{title}</h2>
      {children}
    </dialog>
  );
}
