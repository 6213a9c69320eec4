window.addEventListener('load', function () {
  var svgs = Array.prototype.slice.call(document.querySelectorAll('figure.plot svg'));
  var plots = svgs.filter(function (s) {
    var r = s.getBoundingClientRect();
    return s.childElementCount > 0 && r.width > 0 && r.height > 0;
  }).length;
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.gallery-thumb'));
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var dedup = Array.prototype.slice.call(document.querySelectorAll('img.dedup-thumb')).filter(
    function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots', String(plots));
  document.body.setAttribute('data-images', String(loaded));
  document.body.setAttribute('data-dedup-images', String(dedup));
  document.body.setAttribute('data-rendered', 'true');
});
