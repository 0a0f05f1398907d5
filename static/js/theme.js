// Applies the saved colour theme before the first paint (a classic, render-blocking script: the
// modules run later and a dark-mode user would see a white flash). "auto" follows the system.
(function () {
  try {
    var t = localStorage.getItem("exllama.theme");
    if (t === "light" || t === "dark") document.documentElement.dataset.theme = t;
  } catch (e) { /* storage disabled: follow the system */ }
})();
