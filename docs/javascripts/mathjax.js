// MathJax 3 for the formulas of the docs and docstrings (pymdownx.arithmatex wraps them in
// .arithmatex) and of the notebook's Markdown cells ($...$ inside .jp-RenderedMarkdown).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  // typeset only inside those: any element with a class is skipped unless it is one of them, so the
  // notebook's unclassed paragraphs and list items are typeset and the rest of a page is left alone
  options: {
    ignoreHtmlClass: ".+",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown"
  }
};

// Material's instant navigation swaps pages without reloading: typeset each new page
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
